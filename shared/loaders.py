"""Load models through `from_pretrained`: safetensors only, remote code off unless a model entry allows it.

Heavy libraries are imported inside the functions, so importing this module loads nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from shared.devices import resolve_device, resolve_dtype
from shared.locations import pretrained_location
from shared.registry import parse_source
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedCausalLM:
    entry: ModelEntry
    model: Any  # transformers PreTrainedModel, in eval mode on `device`
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def _placement(entry: ModelEntry, settings: Settings) -> tuple[str, dict[str, Any], torch.device, torch.dtype]:
    """Where the weights are, how to read them, and the device and dtype they go to."""
    location, kwargs = pretrained_location(entry, settings)
    device = resolve_device(entry.device)
    dtype = resolve_dtype(entry.dtype, device)
    log.info("loading model", extra={"model": entry.name, "source": entry.source, "device": str(device)})
    return location, kwargs, device, dtype


def load_causal_lm(entry: ModelEntry, settings: Settings) -> LoadedCausalLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    location, kwargs, device, dtype = _placement(entry, settings)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, use_safetensors=True, **kwargs)
    model.to(device).eval()
    return LoadedCausalLM(entry=entry, model=model, tokenizer=tokenizer, device=device, dtype=dtype)


@dataclass
class LoadedDiffusionPipeline:
    entry: ModelEntry
    pipeline: Any  # diffusers StableDiffusionPipeline on `device`
    device: torch.device
    dtype: torch.dtype


def load_diffusion_pipeline(entry: ModelEntry, settings: Settings) -> LoadedDiffusionPipeline:
    """A Stable Diffusion (1.x/2.x, Turbo) pipeline; img2img shares its components via `from_pipe`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    location, kwargs, device, dtype = _placement(entry, settings)
    pipeline = StableDiffusionPipeline.from_pretrained(
        location,
        dtype=dtype,
        use_safetensors=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **kwargs,
    )
    if device.type != "cpu":
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return LoadedDiffusionPipeline(entry=entry, pipeline=pipeline, device=device, dtype=dtype)


def prepare(entry: ModelEntry, settings: Settings) -> str:
    """Make an entry's weights available locally: build a built-in, download an hf: snapshot, or convert a
    GGUF checkpoint."""
    from shared import gguf

    if gguf.is_gguf(entry):
        return str(gguf.prepare(entry, settings))
    source = parse_source(entry.source)
    if source.kind == "hf":
        from huggingface_hub import snapshot_download

        # configs, tokenizers and safetensors weights only: no pickled .bin/.ckpt duplicates
        patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.safetensors"]
        return snapshot_download(source.ref, revision=source.revision, allow_patterns=patterns)
    location, _ = pretrained_location(entry, settings)
    return location
