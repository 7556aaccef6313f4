"""The training data path: the diffusion recipe's steps/s with DataLoader worker processes decoding and
resizing the images, over the same job with the data prepared in the training process (what the loop did
before the DataLoader), side by side in one run.

The dataset is photo-sized: 32 JPEGs of 1024×768 (noise, so decoding costs what a photo's does), trained
at 64 pixels on tiny-sd and tiny-sdxl, where the images, not the model, bound a step; and the bundled
64×64 sample, where the model does. (By default a CPU job uses no workers and a GPU rank up to 4.)
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from bench.report import Row

ROUNDS = 3
STEPS = 24
MODELS = ["tiny-sd", "tiny-sdxl"]
NOTE = (
    f"Medians of {ROUNDS} rounds, {STEPS} optimizer steps each, batch 4, float32, the recipe's setup excluded "
    "(steps/s of `Trainer.run`, the workers' start included). Ratio: with 2 workers over 0 (the data prepared "
    "on the training thread)."
)


def photo_zip(count: int = 32, size: tuple[int, int] = (1024, 768)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        lines = []
        for k in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            data = io.BytesIO()
            Image.fromarray(pixels).save(data, format="JPEG", quality=90)
            archive.writestr(f"{k:03d}.jpg", data.getvalue())
            lines.append(json.dumps({"file_name": f"{k:03d}.jpg", "text": f"photo {k % 4}"}))
        archive.writestr("metadata.jsonl", "\n".join(lines) + "\n")
    return buffer.getvalue()


def _steps_per_second(settings, model: str, dataset: Path, records: int, workers: int, job_dir: Path) -> float:
    from services.finetune.hyperparams import UNET_TARGETS, Hyperparameters, TrainingData, resolve
    from services.finetune.training.launch import TrainingSpec
    from services.finetune.training.recipe import load_recipe

    data = TrainingData(kind="diffusion", num_records=records, architecture="unet", native_resolution=64,
                        family=model.removeprefix("tiny-"), targets=UNET_TARGETS)  # fmt: skip
    hyperparameters = Hyperparameters(
        max_steps=STEPS, batch_size=4, mixed_precision="no", validation_fraction=0, resolution=64, random_crop=True
    )
    hp, total = resolve(hyperparameters, data)
    tuned = settings.model_copy(
        update={"finetune": settings.finetune.model_copy(update={"dataloader_workers": workers})}
    )
    entry = next(m for m in tuned.models if m.name == model)
    shutil.rmtree(job_dir, ignore_errors=True)  # a checkpoint left there would resume the run
    spec = TrainingSpec("bench", "diffusion", entry, dataset, hp, total, job_dir)
    recipe = load_recipe("diffusion")(spec.context(tuned, None, torch.device("cpu")))
    recipe.setup()
    try:
        start = time.perf_counter()
        recipe.train()
        return STEPS / (time.perf_counter() - start)
    finally:
        recipe.cleanup()


def run(workdir: Path) -> list[Row]:
    from services.finetune.samples import diffusion_sample_zip
    from shared.builtin import ensure_builtin
    from shared.settings import Settings

    workdir.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        ensure_builtin(model, workdir / "models")
    entries = [{"name": m, "kind": "diffusion", "source": f"builtin:{m}", "dtype": "float32"} for m in MODELS]
    settings = Settings.model_validate({"data_dir": str(workdir), "models": entries, "log_level": "WARNING"})
    datasets = {"1024×768 JPEGs": (workdir / "photos.zip", photo_zip(), 32)}
    datasets["64×64 sample"] = (workdir / "shapes.zip", diffusion_sample_zip(), 16)
    rows = []
    for label, (path, data, records) in datasets.items():
        path.write_bytes(data)
        for model in MODELS:
            _steps_per_second(settings, model, path, records, 2, workdir / "warm-up")  # imports, first kernels
            pairs = []
            for round_ in range(ROUNDS):
                job = workdir / f"data-path-{path.stem}-{model}-{round_}"
                workers = _steps_per_second(settings, model, path, records, 2, job / "w2")
                inline = _steps_per_second(settings, model, path, records, 0, job / "w0")
                pairs.append((workers, inline))
            rows.append(Row.of_pairs(model, f"steps/s, {label}, 2 workers", pairs, ".2f", "0 workers"))
    return rows
