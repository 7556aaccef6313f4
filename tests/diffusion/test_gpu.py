"""Half precision for real in the diffusion service: the pipeline's weights are bf16/fp16, and a batch run by
`DiffusionEngine` (with a LoRA) matches each image's seed run alone, and an inpainting batch keeps each init
image where its mask is black.

On a GPU these run with the device's half dtype; the same checks run on the CPU in bf16 on every CI run.
diffusers 0.42's `from_pretrained` honours `dtype=` (checked here: `torch_dtype=` is deprecated).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from services.diffusion.engine import ImageJob
from shared.loaders import load_diffusion_pipeline
from tests.diffusion.test_engine import Events, image_request, make_engine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [
    pytest.param("cuda", "auto", marks=[pytest.mark.gpu, cuda], id="cuda"),
    pytest.param("cpu", "bfloat16", id="cpu-bf16"),
]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_half_precision_engine_batch_with_lora_matches_each_seed_alone(settings, diffusion_adapters, device, dtype):
    entry = next(m for m in settings.models if m.kind == "diffusion").model_copy(
        update={"device": device, "dtype": dtype}
    )
    pipe = load_diffusion_pipeline(entry, settings).pipeline
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):  # what the weights are, not what was asked
        assert component.dtype in (torch.bfloat16, torch.float16), component.dtype
        assert component.device.type == device
    engine = make_engine(pipe, settings, max_waiting=16)

    prompts = ["a cat", "a dog", "a boat", "a tree"]
    together = [Events() for _ in prompts]
    for seed, (prompt, events) in enumerate(zip(prompts, together, strict=True)):
        engine.submit(ImageJob(_with_adapter(image_request(prompt, seed), diffusion_adapters[0]), events))
    engine.start()  # the four were queued before the loop ran: they meet in one batch
    try:
        batched = [events.result().images[0] for events in together]
        alone = []
        for seed, prompt in enumerate(prompts):
            events = Events()
            engine.submit(ImageJob(_with_adapter(image_request(prompt, seed), diffusion_adapters[0]), events))
            alone.append(events.result().images[0])
    finally:
        engine.shutdown()
    for b, a in zip(batched, alone, strict=True):
        assert b.seed == a.seed
        difference = np.abs(pixels(b.png) - pixels(a.png))
        assert difference.mean() <= 2.0 and difference.max() <= 32, (difference.mean(), difference.max())
        assert pixels(a.png).std() > 0, "a real image, not a constant (NaNs decode to black)"


def _with_adapter(request, adapter: str):
    from dataclasses import replace

    return replace(request, adapter=adapter, adapter_scale=0.8)


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_half_precision_inpainting_keeps_the_init_image_where_the_mask_is_black(settings, device, dtype):
    from tests.diffusion.test_engine import KEEP, gradient, inpaint_request

    entry = next(m for m in settings.models if m.kind == "diffusion").model_copy(
        update={"device": device, "dtype": dtype}
    )
    pipe = load_diffusion_pipeline(entry, settings).pipeline
    engine = make_engine(pipe, settings, max_waiting=16)
    jobs = [(inpaint_request("a cat", 1, gradient(), "left"), "left", Events())]
    jobs.append((inpaint_request("a dog", 2, gradient(True), "right"), "right", Events()))
    for request, _, events in jobs:
        engine.submit(ImageJob(request, events))
    engine.start()  # both were queued before the loop ran: they meet in one batch
    try:
        for request, keep, events in jobs:
            image = pixels(events.result().images[0].png)
            init = np.asarray(request.init_image, np.int16)
            assert np.array_equal(image[KEEP[keep]], init[KEEP[keep]])
            repainted = image[KEEP["right" if keep == "left" else "left"]]
            assert repainted.std() > 0, "a real image, not a constant (NaNs decode to black)"
    finally:
        engine.shutdown()
