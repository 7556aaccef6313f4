"""Load models through `from_pretrained`: safetensors only, remote code off unless a model entry allows it.

Heavy libraries are imported inside the functions, so importing this module loads nothing.
"""

from __future__ import annotations

import glob
import inspect
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared import hub_files
from shared.devices import DTypeChoice, choose_dtype, dtype_name, resolve_device
from shared.diffusion_families import FAMILIES, Family, family_of_class, other_family
from shared.errors import FailedPrecondition
from shared.locations import prepared_folder, pretrained_location
from shared.quantization import fit_cpu_kernels, quantization_config, weight_bytes
from shared.registry import ModelSource, parse_source
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedCausalLM:
    entry: ModelEntry
    model: Any  # transformers PreTrainedModel, in eval mode on `device`
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype  # what it computes in (a quantized model's linear layers hold packed weights)
    dtype_reason: str = ""
    quantization: str = "none"
    weight_bytes: int = 0  # the loaded weights, quantization scales included


def _placement(entry: ModelEntry, settings: Settings) -> tuple[str, dict[str, Any], torch.device, DTypeChoice]:
    """Where the weights are, how to read them, and the device and dtype they go to."""
    location, kwargs = pretrained_location(entry, settings)
    device = resolve_device(entry.device)
    choice = choose_dtype(entry.dtype, device)
    log.info(
        "loading model",
        extra={
            "model": entry.name,
            "source": entry.source,
            "device": str(device),
            "dtype": dtype_name(choice.dtype),
            "dtype_reason": choice.reason,
        },
    )
    return location, kwargs, device, choice


def load_causal_lm(entry: ModelEntry, settings: Settings) -> LoadedCausalLM:
    return _load_transformer("AutoModelForCausalLM", entry, settings)


def load_encoder(entry: ModelEntry, settings: Settings) -> LoadedCausalLM:
    """An embedding model's transformer without a head (`AutoModel`): encoders and decoder embedders alike."""
    return _load_transformer("AutoModel", entry, settings)


def _load_transformer(auto_class: str, entry: ModelEntry, settings: Settings) -> LoadedCausalLM:
    import transformers

    disable_progress_bars()
    location, kwargs, device, choice = _placement(entry, settings)
    tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
    keep = ["pooler"] if auto_class == "AutoModel" else None  # encoders: see `quantization_config`
    model = from_pretrained_on(
        getattr(transformers, auto_class), location, kwargs, choice.dtype, device, entry.quantization, keep
    )
    model.eval()
    return LoadedCausalLM(
        entry, model, tokenizer, device, choice.dtype, choice.reason, entry.quantization, weight_bytes(model)
    )


def from_pretrained_on(
    auto_class, location: str, kwargs: dict, dtype: torch.dtype, device: torch.device, quantization: str,
    keep: list[str] | None = None,
):  # fmt: skip
    """`auto_class.from_pretrained` in `dtype` on `device`, its linear layers quantized as `quantization`
    (then loaded straight onto the device: a quantized model is not moved after loading). Serving and
    training load through this."""
    config = quantization_config(quantization, device, dtype, keep)
    if config is not None:
        kwargs = {**kwargs, "quantization_config": config, "device_map": {"": device}}
    model = auto_class.from_pretrained(location, dtype=dtype, use_safetensors=True, **kwargs)
    if config is None:
        model.to(device)
    elif device.type == "cpu":
        fit_cpu_kernels(model)
    return model


@dataclass
class LoadedDiffusionPipeline:
    entry: ModelEntry
    pipeline: Any  # a diffusers text-to-image pipeline on `device`
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str = ""
    family: Family = FAMILIES["sd"]


def disable_progress_bars() -> None:
    """No loading bars from transformers (or diffusers, where this process uses it) in a service's log, where a
    bar is a line per update. Hub downloads keep theirs where the environment allows (`_download`)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def load_diffusion_pipeline(entry: ModelEntry, settings: Settings) -> LoadedDiffusionPipeline:
    """A text-to-image pipeline of the entry's family (read from `model_index.json` unless the entry sets it);
    the engine derives its image-to-image and inpainting pipelines from it (`from_pipe`)."""
    import diffusers

    disable_progress_bars()
    location, kwargs, device, choice = _placement(entry, settings)
    family = declared_family(entry, location)
    # a family we do not describe (or a checkpoint not on disk yet): diffusers' AutoPipeline picks the class
    pipeline_class = diffusers.AutoPipelineForText2Image if family is None else getattr(diffusers, family.text2img)
    if family is not None and family.name == "sd":  # SD 1.x checkpoints carry a safety checker: never loaded
        kwargs = {**kwargs, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline = pipeline_class.from_pretrained(
        location,
        dtype=choice.dtype,
        use_safetensors=True,
        variant=_downloaded_variant(entry, settings),  # what prepare downloaded
        **kwargs,
    )
    if device.type != "cpu":
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    class_name = type(pipeline).__name__
    takes_negative = "negative_prompt" in inspect.signature(pipeline.__call__).parameters
    family = family or family_of_class(class_name) or other_family(class_name, takes_negative)
    return LoadedDiffusionPipeline(entry, pipeline, device, choice.dtype, choice.reason, family)


def load_controlnet(entry: ModelEntry, settings: Settings):
    """A ControlNet model (diffusers' `ControlNetModel`, or `FluxControlNetModel` for Flux) in its entry's dtype;
    the diffusion host moves it to each model's device and dtype it serves."""
    from diffusers import ControlNetModel, FluxControlNetModel

    disable_progress_bars()
    location, kwargs, device, choice = _placement(entry, settings)
    kwargs.pop("trust_remote_code", None)
    folder = Path(location)  # prepare downloads the fp16 weights alone where the repository has no others
    fp16_only = folder.is_dir() and not (folder / "diffusion_pytorch_model.safetensors").exists()
    model_class = FluxControlNetModel if entry.controlnet.base_family == "flux" else ControlNetModel
    model = model_class.from_pretrained(
        location, dtype=choice.dtype, use_safetensors=True, variant="fp16" if fp16_only else None, **kwargs
    )
    return model.to(device).eval()


def declared_family(entry: ModelEntry, location: str) -> Family | None:
    """The entry's family, checked against the checkpoint's `model_index.json` where it is on disk; with
    `auto`, the checkpoint's (None: a family of AutoPipeline's we do not describe, or not on disk yet)."""
    index = Path(location) / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    found = family_of_class(class_name)
    if entry.diffusion.family == "auto":
        return found
    declared = FAMILIES[entry.diffusion.family]
    if class_name and found is not declared:
        raise FailedPrecondition(
            f"model {entry.name!r} sets diffusion.family {declared.name!r}, but its model_index.json names "
            f"{class_name} ({found.name if found else 'another family'}); fix the family or use auto"
        )
    return declared


def _downloaded_variant(entry: ModelEntry, settings: Settings) -> str | None:
    """The weights variant `prepare` put on disk ("fp16" or None); None too when nothing is there yet."""
    try:
        return hub_files.prepared_variant(prepared_folder(entry, settings))
    except FailedPrecondition:  # not prepared: from_pretrained downloads (allow_downloads) or says why not
        return None


def prepare(entry: ModelEntry, settings: Settings) -> str:
    """Make an entry's weights available locally: build a built-in, download an hf: snapshot, or convert a
    GGUF checkpoint."""
    from shared import gguf

    if gguf.is_gguf(entry):
        return str(gguf.prepare(entry, settings))
    source = parse_source(entry.source)
    if source.kind == "hf":
        return _download(entry, source)
    location, _ = pretrained_location(entry, settings)
    return location


def _download(entry: ModelEntry, source: ModelSource) -> str:
    """Download the files the loader reads (chosen by `shared.hub_files`), with the hub's progress bars; the
    hub's token and endpoint come from its own environment variables and login."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import enable_progress_bars

    tree = HfApi().list_repo_tree(source.ref, revision=source.revision, recursive=True)
    sizes = {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    model_index, variant = None, None
    if entry.kind == "diffusion" and "model_index.json" in sizes:
        model_index = json.loads(
            Path(hf_hub_download(source.ref, "model_index.json", revision=source.revision)).read_text()
        )
        variant = hub_files.pick_variant(sizes, entry.dtype, model_index)
    files = hub_files.select_files(sizes, entry.kind, variant, entry.trust_remote_code, model_index=model_index)
    total = sum(sizes[f] for f in files)
    size = f"{total / 1e9:.1f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"
    weights = f", {variant} weights" if variant else ""
    # prepare is a command-line step: this line and the hub's progress bars are its output
    print(f"{entry.name}: downloading {len(files)} files ({size}{weights}) from {source.ref}", flush=True)
    if not constants.HF_HUB_DISABLE_PROGRESS_BARS:  # the environment decides; a model loaded earlier does not
        enable_progress_bars("huggingface_hub")
    patterns = [glob.escape(f) for f in files]  # exact names, not globs
    return snapshot_download(source.ref, revision=source.revision, allow_patterns=patterns)
