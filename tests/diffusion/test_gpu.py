"""CUDA paths of the diffusion service: half-precision weights, a batched call, LoRA. Run where a GPU is."""

from __future__ import annotations

import pytest
import torch

from shared.adapters import AdapterStore
from shared.loaders import load_diffusion_pipeline
from shared.settings import Settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_half_precision_batched_generation_with_lora_on_cuda(settings, diffusion_adapters):
    from services.diffusion.adapters import DiffusionAdapterCache

    entry = next(m for m in settings.models if m.kind == "diffusion").model_copy(update={"device": "cuda"})
    cuda = Settings.model_validate(settings.model_dump() | {"models": [entry.model_dump()]})
    loaded = load_diffusion_pipeline(cuda.models[0], cuda)
    assert loaded.dtype in (torch.bfloat16, torch.float16)
    adapters = DiffusionAdapterCache(loaded.pipeline, AdapterStore(cuda.adapters_dir), 2, "tiny-sd", "builtin:tiny-sd")
    adapters.activate(diffusion_adapters[0], 0.8)
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(4)]
    images = loaded.pipeline(["a cat"] * 4, num_inference_steps=4, generator=generators, output_type="np").images
    assert images.shape == (4, 64, 64, 3)
    assert not torch.isnan(torch.from_numpy(images)).any()
