"""Diffusion serving benchmark, on each built-in tiny family (SD, SDXL, SD3, Flux), measured side by side:

(a) one request through gRPC vs the same pipeline call in process (median);
(b) images/s of 4 concurrent requests vs the same 4 requests one at a time, both through the service;
(c) the ceiling for (b): the bare pipeline in process, one call of 4 prompts vs 4 calls of 1;
(d) inpainting over text-to-image at the same size and steps, both through the service;
(e) SD, SDXL and Flux: a request with one ControlNet over text-to-image at the same size and steps.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from PIL import Image

from bench.report import Row
from shared.loaders import load_diffusion_pipeline
from shared.settings import Settings
from tests.harness import spawn_service

MODELS = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"]
SIZE = 64
STEPS = 20
ROUNDS = 5
CONTROLNETS = {model: model.replace("tiny-", "tiny-controlnet-") for model in ("tiny-sd", "tiny-sdxl", "tiny-flux")}
PROMPTS = ["a lighthouse at dusk", "a bowl of ramen", "a fox in the snow", "a city street in the rain"]


def _entry(name: str) -> dict:
    return {"name": name, "kind": "diffusion", "source": f"builtin:{name}", "dtype": "float32",
            "diffusion": {"width": SIZE, "height": SIZE, "steps": STEPS}}  # fmt: skip


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class InProcess:
    """The bare pipeline, called as the service calls it (family defaults, the checkpoint's scheduler)."""

    def __init__(self, settings: Settings, name: str):
        entry = next(m for m in settings.models if m.name == name)
        loaded = load_diffusion_pipeline(entry, settings)
        self.pipe, self.family = loaded.pipeline, loaded.family
        self._scheduler = (type(self.pipe.scheduler), dict(self.pipe.scheduler.config))
        self._sequence_length = entry.diffusion.max_sequence_length or self.family.max_sequence_length

    def __call__(self, prompts: list[str], seeds: list[int]) -> float:
        scheduler_class, config = self._scheduler
        self.pipe.scheduler = scheduler_class.from_config(config)
        kwargs = dict(num_inference_steps=STEPS, guidance_scale=self.family.default_guidance, width=SIZE, height=SIZE)
        if self._sequence_length:
            kwargs["max_sequence_length"] = self._sequence_length
        start = time.perf_counter()
        with torch.inference_mode():
            self.pipe(prompts, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kwargs)
        return time.perf_counter() - start


def _measure(stub, pb2, name: str, in_process: InProcess) -> list[Row]:
    init = stub.GenerateImages(pb2.GenerateImagesRequest(model=name, prompt=PROMPTS[0], seed=99)).images[0].png
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4))

    def call(i: int, **fields) -> float:
        start = time.perf_counter()
        stub.GenerateImages(pb2.GenerateImagesRequest(model=name, prompt=PROMPTS[i], seed=i, **fields))
        return time.perf_counter() - start

    call(0), in_process(PROMPTS[:1], [0]), call(0, init_image=init, mask_image=_png(mask))  # warm-ups
    control = [pb2.ControlInput(model=CONTROLNETS[name], image=init)] if name in CONTROLNETS else None
    if control:
        call(0, control=control)
    single, concurrent, ceiling, inpaint, controlled = [], [], [], [], []
    for _ in range(ROUNDS):
        for i in range(2):
            single.append((call(i), in_process(PROMPTS[i : i + 1], [i])))
        start = time.perf_counter()
        for i in range(len(PROMPTS)):
            call(i)
        one_at_a_time = len(PROMPTS) / (time.perf_counter() - start)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            list(pool.map(call, range(len(PROMPTS))))
        concurrent.append((len(PROMPTS) / (time.perf_counter() - start), one_at_a_time))
        singles = sum(in_process([p], [i]) for i, p in enumerate(PROMPTS))
        batched = in_process(PROMPTS, list(range(len(PROMPTS))))
        ceiling.append((len(PROMPTS) / batched, len(PROMPTS) / singles))
        inpaint.append((call(1, init_image=init, mask_image=_png(mask)), call(1)))
        if control:
            controlled.append((call(1, control=control), call(1)))
    guidance = "distilled guidance" if in_process.family.distilled_guidance else "CFG"
    rows = [
        Row.of_pairs(name, f"(a) one request ({STEPS} steps, {guidance}), s", single, ".3f", "same call in process"),
        Row.of_pairs(name, "(b) images/s, 4 concurrent requests", concurrent, ".2f", "the 4 one at a time"),
        Row.of_pairs(name, "(c) images/s, in process: 1 call of 4 prompts", ceiling, ".2f", "4 calls of 1"),
        Row.of_pairs(name, "(d) one inpainting request, s", inpaint, ".3f", "text-to-image, same size and steps"),
    ]
    if controlled:
        rows.append(Row.of_pairs(name, "(e) one request with a ControlNet, s", controlled, ".3f", "text-to-image"))
    return rows


def run(workdir: Path) -> list[Row]:
    from modelworks.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

    controlnets = [
        {"name": "tiny-controlnet-sd", "kind": "controlnet", "source": "builtin:tiny-controlnet-sd",
         "dtype": "float32"},
        {"name": "tiny-controlnet-sdxl", "kind": "controlnet", "source": "builtin:tiny-controlnet-sdxl",
         "dtype": "float32", "controlnet": {"base_family": "sdxl"}},
        {"name": "tiny-controlnet-flux", "kind": "controlnet", "source": "builtin:tiny-controlnet-flux",
         "dtype": "float32", "controlnet": {"base_family": "flux"}},
    ]  # fmt: skip
    models = [_entry(m) for m in MODELS] + controlnets
    config = {"data_dir": str(workdir), "models": models, "log_level": "WARNING"}
    settings = Settings.model_validate(config)
    server = spawn_service("diffusion", workdir / "diffusion-server", config)
    rows: list[Row] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            for name in MODELS:
                rows += _measure(stub, diffusion_pb2, name, InProcess(settings, name))
    finally:
        server.stop()
    return rows


NOTE = (
    f"{SIZE}x{SIZE}, float32, each model's own scheduler and guidance. Medians of {ROUNDS} rounds, each ratio the"
    " median of per-round ratios. (a) gRPC time over in-process time, 1.00 = no overhead; (b) concurrent over"
    " one-at-a-time throughput, higher is better; (c) the same for the bare pipeline in process: the most batching"
    " can give on this machine, the ceiling for (b); (d) inpainting time over text-to-image time; (e) the same for"
    " one ControlNet (scale 1, the init image as its control image)."
)
