"""The training data path, in process: DataLoader worker processes give exactly the losses of preparing the
data in the training process (resume included), the test split is held out and scored at the end, aspect
buckets keep each micro-batch to one shape, and DreamBooth's class images train beside the subject."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from services.finetune.hyperparams import TRANSFORMER_TARGETS, UNET_TARGETS, Hyperparameters, TrainingData, resolve
from services.finetune.samples import diffusion_sample_zip
from services.finetune.training.batches import StepBatches
from services.finetune.training.launch import TrainingSpec, train_here
from services.finetune.training.loop import StopReason, TrainingStopped
from services.finetune.training.recipe import load_recipe
from shared.settings import Settings
from tests.finetune.test_training import Recorder
from tests.finetune.test_training import spec_for as llm_spec

pytestmark = pytest.mark.timeout(900)

CPU = torch.device("cpu")
FAMILIES = {"sd": "tiny-sd", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}


@pytest.fixture(scope="module")
def family_settings(data_dir) -> Settings:
    from shared.builtin import ensure_builtin

    for name in FAMILIES.values():
        ensure_builtin(name, data_dir / "models")
    entries = [
        {"name": n, "kind": "diffusion", "source": f"builtin:{n}", "dtype": "float32"} for n in FAMILIES.values()
    ]
    return Settings.model_validate({"data_dir": str(data_dir), "models": entries})


def with_workers(settings: Settings, workers: int) -> Settings:
    return settings.model_copy(
        update={"finetune": settings.finetune.model_copy(update={"dataloader_workers": workers})}
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "shapes.zip"
    path.write_bytes(diffusion_sample_zip())
    return path


def mixed_aspect_zip() -> bytes:
    """Twelve images: four landscape (96×48), four portrait (48×96), four square (64×64), each a gradient."""
    buffer = io.BytesIO()
    sizes = [(96, 48)] * 4 + [(48, 96)] * 4 + [(64, 64)] * 4
    with zipfile.ZipFile(buffer, "w") as archive:
        lines = []
        for k, (width, height) in enumerate(sizes):
            image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
            data = io.BytesIO()
            image.save(data, format="PNG")
            archive.writestr(f"{k:02d}.png", data.getvalue())
            lines.append(json.dumps({"file_name": f"{k:02d}.png", "text": f"a gradient {width}x{height}"}))
        archive.writestr("metadata.jsonl", "\n".join(lines) + "\n")
    return buffer.getvalue()


def diffusion_spec(settings, family: str, dataset: Path, job_dir: Path, num_records: int = 16, **hyperparameters):
    entry = next(m for m in settings.models if m.name == FAMILIES[family])
    data = TrainingData(
        kind="diffusion",
        num_records=num_records,
        architecture="unet" if family in ("sd", "sdxl") else "transformer",
        native_resolution=32,
        family=family,
        guidance_embeds=family == "flux",
        targets=UNET_TARGETS if family in ("sd", "sdxl") else TRANSFORMER_TARGETS,
    )
    defaults = {"mixed_precision": "no", "max_steps": 6, "learning_rate": 1e-3, "batch_size": 2, "seed": 3}
    hp, total = resolve(Hyperparameters(**(defaults | hyperparameters)), data)
    return TrainingSpec("job", "diffusion", entry, dataset, hp, total, job_dir)


def set_up(spec: TrainingSpec, settings: Settings):
    recipe = load_recipe(spec.kind)(spec.context(settings, None, CPU))
    recipe.setup()
    return recipe


@pytest.mark.parametrize("family", list(FAMILIES))
def test_worker_processes_give_the_losses_of_the_training_process(family_settings, shapes, tmp_path, family):
    """random_crop and random_flip on: the augmentation's randomness is the item's, not the worker's."""
    runs = {}
    for workers in (0, 2):
        settings = with_workers(family_settings, workers)
        spec = diffusion_spec(settings, family, shapes, tmp_path / f"w{workers}", random_crop=True, random_flip=True)
        runs[workers] = train_here(spec, settings, None, None, CPU).losses
    assert len(runs[0]) == 6
    torch.testing.assert_close(torch.tensor(runs[2]), torch.tensor(runs[0]), rtol=1e-5, atol=1e-6)


def test_a_resumed_diffusion_job_with_workers_goes_on_with_the_same_batches(family_settings, shapes, tmp_path):
    settings = with_workers(family_settings, 2)
    options = {"max_steps": 8, "save_steps": 2, "random_crop": True, "random_flip": True, "resolution": 48}
    straight = train_here(
        diffusion_spec(settings, "sdxl", shapes, tmp_path / "a", **options), settings, None, None, CPU
    )
    spec = diffusion_spec(settings, "sdxl", shapes, tmp_path / "b", **options)
    with pytest.raises(TrainingStopped):
        train_here(spec, settings, Recorder(stop_at=3, reason=StopReason.PREEMPTED), None, CPU)
    hooks = Recorder()
    resumed = train_here(spec, settings, hooks, None, CPU)
    assert hooks.resumed_from == 3
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[3:]), rtol=1e-5, atol=1e-6)


def test_llm_batches_from_worker_processes_give_the_same_losses(settings, tmp_path):
    from services.finetune.samples import llm_sample_jsonl

    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(llm_sample_jsonl())
    runs = [
        train_here(llm_spec(dataset, tmp_path / f"w{w}", max_steps=5), with_workers(settings, w), None, None, CPU)
        for w in (0, 2)
    ]
    torch.testing.assert_close(torch.tensor(runs[1].losses), torch.tensor(runs[0].losses), rtol=1e-5, atol=1e-6)


def test_the_test_split_is_held_out_and_scored_once_with_the_final_weights(family_settings, shapes, tmp_path):
    spec = diffusion_spec(
        family_settings, "sd", shapes, tmp_path / "job", validation_fraction=0.25, test_fraction=0.25, max_steps=4
    )
    recipe = set_up(spec, family_settings)
    split = recipe.split
    names = [{r["file_name"] for r in part} for part in (split.train, split.validation, split.test)]
    assert [len(n) for n in names] == [8, 4, 4]
    assert not (names[0] & names[2]) and not (names[1] & names[2]), "test records never train or validate"
    result = recipe.train()
    assert result.test_loss is not None and result.test_loss > 0
    assert recipe.trainer.evaluate(split.test) == pytest.approx(result.test_loss, rel=1e-6)
    assert recipe.trainer.evaluate(split.validation) != pytest.approx(result.test_loss, rel=1e-6)


def test_an_llm_test_split_reports_a_loss_per_label_token(settings, tmp_path):
    from services.finetune.samples import llm_sample_jsonl

    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(llm_sample_jsonl())
    result = train_here(llm_spec(dataset, tmp_path / "job", max_steps=4, test_fraction=0.2), settings, None, None, CPU)
    assert result.test_loss is not None and 0 < result.test_loss < 20


def test_aspect_buckets_keep_each_micro_batch_to_one_shape(family_settings, tmp_path):
    dataset = tmp_path / "mixed.zip"
    dataset.write_bytes(mixed_aspect_zip())
    spec = diffusion_spec(family_settings, "sdxl", dataset, tmp_path / "job", num_records=12, resolution=32)
    recipe = set_up(spec, family_settings)
    buckets = {r["file_name"]: r["bucket"] for r in recipe.split.train}
    assert buckets["00.png"][0] > buckets["00.png"][1] and buckets["04.png"][0] < buckets["04.png"][1]
    assert buckets["08.png"] == (32, 32)
    pipeline = recipe.pipeline()
    groups = sorted(set(buckets.values()))
    batches = StepBatches(12, 2, 1, seed=3, groups=[groups.index(r["bucket"]) for r in recipe.split.train])
    for step in range(batches.steps_per_epoch):
        (micro,) = batches.micro_batches(step)
        records = [recipe.split.train[i] for i in micro]
        batch = pipeline.collate([pipeline.prepare(r, seed=step) for r in records])
        width, height = records[0]["bucket"]
        assert batch["pixels"].shape == (2, 3, height, width)
        assert {r["bucket"] for r in records} == {(width, height)}
        original = Image.open(io.BytesIO(recipe.archive.read(records[0]["file_name"]))).size
        assert batch["time_ids"][0, :2].tolist() == [original[1], original[0]], "SDXL's original-size conditioning"
    result = recipe.train()
    assert len(result.losses) == 6


def test_without_aspect_buckets_every_image_is_the_square_crop(family_settings, tmp_path):
    dataset = tmp_path / "mixed.zip"
    dataset.write_bytes(mixed_aspect_zip())
    spec = diffusion_spec(
        family_settings, "sd", dataset, tmp_path / "job", num_records=12, resolution=32, aspect_buckets=False
    )
    recipe = set_up(spec, family_settings)
    assert {r["bucket"] for r in recipe.split.train} == {(32, 32)}


def test_grouped_step_batches_deal_one_group_per_micro_batch_and_split_across_ranks():
    groups = [k % 3 for k in range(30)]
    single = StepBatches(30, 4, 2, seed=5, groups=groups)
    assert single.steps_per_epoch == 3
    seen = []
    for step in range(single.steps_per_epoch):
        for micro in single.micro_batches(step):
            seen += micro
            assert len(micro) == 4
    assert len(set(seen)) == len(seen) == 24
    uniform = sum(len({groups[i] for i in m}) == 1 for s in range(3) for m in single.micro_batches(s))
    assert uniform >= 5, "only the pooled leftovers mix groups"
    ranks = [StepBatches(30, 4, 2, seed=5, rank=r, world_size=2, groups=groups) for r in (0, 1)]
    for step in range(6):
        together = [sorted(a + b) for a, b in zip(*(r.micro_batches(step) for r in ranks), strict=True)]
        assert together == [sorted(m) for m in single.micro_batches(step)]


def test_prior_preservation_draws_class_images_and_trains_on_them(family_settings, shapes, tmp_path):
    options = {"class_prompt": "a shape", "num_class_images": 3, "resolution": 32, "max_steps": 3}
    spec = diffusion_spec(family_settings, "sd", shapes, tmp_path / "job", **options)
    recipe = set_up(spec, family_settings)
    folder = tmp_path / "job" / "class-images"
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    first = (folder / "0000.png").read_bytes()
    record = recipe.split.train[0]
    batch = recipe.pipeline().collate([recipe.pipeline().prepare(record, seed=1)])
    assert batch["class_pixels"].shape == batch["pixels"].shape and batch["class_texts"] == ["a shape"]
    recipe.denoiser.train()
    torch.manual_seed(0)
    with_prior, _ = recipe.loss_sum(recipe.denoiser, batch)
    batch.pop("class_pixels")
    torch.manual_seed(0)
    alone, _ = recipe.loss_sum(recipe.denoiser, batch)
    assert float(with_prior.detach()) > float(alone.detach()), "the class image's loss is added"
    assert len(recipe.train().losses) == 3
    again = set_up(diffusion_spec(family_settings, "sd", shapes, tmp_path / "job", **options), family_settings)
    assert (folder / "0000.png").read_bytes() == first and again.class_images.complete(), "a resume reuses them"


@pytest.mark.parametrize(
    ("family", "hyperparameters", "message"),
    [
        ("sd", {"guidance_scale": 2.0}, "guidance_scale applies to Flux bases"),
        ("flux", {"guidance_scale": 1000.0}, "guidance_scale must be in"),
        ("sd", {"num_class_images": 4}, "set class_prompt"),
        ("sd", {"class_prompt": "x", "num_class_images": 5000}, "num_class_images must be at most 1000"),
        ("sd", {"class_prompt": "x", "prior_loss_weight": float("nan")}, "prior_loss_weight"),
        ("sd", {"test_fraction": 0.9}, "test_fraction must be in"),
        ("sd", {"test_fraction": 0.01}, "leaves no test record"),
        ("sd", {"validation_fraction": 0.5, "test_fraction": 0.5}, "leaves no training record"),
    ],
)
def test_bad_data_path_hyperparameters_are_refused(family_settings, shapes, tmp_path, family, hyperparameters, message):
    from shared.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=message):
        diffusion_spec(family_settings, family, shapes, tmp_path, **hyperparameters)


def test_diffusion_only_hyperparameters_are_refused_for_llm_jobs():
    from services.finetune.hyperparams import LLM_TARGETS
    from shared.errors import InvalidArgument

    data = TrainingData(kind="llm", num_records=40, architecture="llama", targets=LLM_TARGETS["llama"])
    for field, value in (("class_prompt", "x"), ("aspect_buckets", True), ("guidance_scale", 1.0)):
        with pytest.raises(InvalidArgument, match=f"{field} apply to diffusion jobs only"):
            resolve(Hyperparameters(**{field: value}), data)


def test_ddp_trains_a_bucketed_sdxl_job_on_two_gloo_ranks(family_settings, tmp_path):
    """Each rank draws its own noise, so the losses are not one process's (the grouped batches' split across
    ranks is checked above); what must hold: the job trains on both ranks and rank 0 writes the adapter."""
    from services.finetune.training.launch import train_distributed

    dataset = tmp_path / "mixed.zip"
    dataset.write_bytes(mixed_aspect_zip())
    spec = diffusion_spec(
        family_settings, "sdxl", dataset, tmp_path / "job", num_records=12, resolution=32, max_steps=4
    )
    result = train_distributed(spec, family_settings, None, tmp_path / "adapter", 2)
    assert len(result.losses) == 4 and all(loss == loss for loss in result.losses)
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").exists()


WIDE_TARGETS = {
    "sd": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"],
    "sdxl": ["to_q", "to_v", "proj_out", "ff.net.0.proj"],
    "sd3": ["to_q", "to_k", "add_q_proj", "to_add_out", "ff.net.2", "ff_context.net.2"],
    "flux": ["to_q", "to_out.0", "add_k_proj", "proj_mlp", "proj_out", "ff.net.0.proj"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_trained_layer_loads_where_the_adapter_is_served(family_settings, shapes, tmp_path, family):
    """Serving loads the file through the family's pipeline (`load_lora_weights`): each layer the job trained
    gets its LoRA, whatever the targets (attention alone, or with projections and feed-forwards)."""
    from peft.tuners.lora import LoraLayer

    from shared.loaders import load_diffusion_pipeline

    spec = diffusion_spec(
        family_settings, family, shapes, tmp_path / "job", max_steps=1, target_modules=WIDE_TARGETS[family]
    )
    recipe = set_up(spec, family_settings)
    recipe.train()
    recipe.save(tmp_path / "adapter")
    trained = sorted(name for name, m in recipe.denoiser.named_modules() if isinstance(m, LoraLayer))
    entry = next(m for m in family_settings.models if m.name == FAMILIES[family])
    pipe = load_diffusion_pipeline(entry, family_settings).pipeline
    pipe.load_lora_weights(tmp_path / "adapter", adapter_name="trained")
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    served = sorted(name for name, m in denoiser.named_modules() if isinstance(m, LoraLayer))
    assert served == trained and len(trained) > 8
    name = trained[0]
    torch.testing.assert_close(
        denoiser.get_submodule(name).lora_B["trained"].weight,
        recipe.denoiser.get_submodule(name).lora_B["default"].weight,
    )
