"""An LLM adapter merged into its base: W = W₀ + ΔW in every adapted layer, by peft's `merge_and_unload` (which
merges DoRA's magnitudes and rsLoRA's scaling as it applies them), then saved as a Hugging Face folder or a
GGUF file into the export store.

The base loads unquantized on the CPU, whatever the serving entry says (a merged model is a full-precision
checkpoint); peft computes each delta in float32 before adding it to a half-precision weight.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from services.finetune.export.checks import check_exportable, check_format, default_name
from services.finetune.export.gguf_file import write_gguf
from services.finetune.export.store import ExportInfo, ExportStore, validate_export_name
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition
from shared.locations import prepared_folder, pretrained_location
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_adapter(
    settings: Settings, adapter: str, fmt: str, gguf_type: str = "F16", dtype: str = "auto", name: str = "",
    owner: str = "",
) -> ExportInfo:  # fmt: skip
    """Merge `adapter` into its base and write it into the export store as `name` (by default
    `<adapter>-merged` or `<adapter>-<gguf type>`)."""
    adapters = AdapterStore(settings.adapters_dir)
    info = adapters.get(adapter)
    check_exportable(info)
    check_format(fmt, gguf_type, dtype)
    name = validate_export_name(name or default_name(adapter, fmt, gguf_type))
    store = ExportStore(settings.exports_dir)
    store.require_free(name)  # before the model loads
    entry = _base_entry(settings, info)
    pretrained_location(entry, settings)  # a built-in base is built on first use
    folder = prepared_folder(entry, settings)  # local files only: an export never downloads
    kwargs = {"trust_remote_code": entry.trust_remote_code}
    model = merged_model(str(folder), kwargs, adapters.path(adapter), dtype)
    record = ExportInfo(
        name=name,
        adapter=adapter,
        base_model=info.base_model,
        format=fmt,
        dtype=_dtype_name(model.dtype) if fmt == "merged" else "",
        gguf_type=gguf_type if fmt == "gguf" else "",
        method=info.method,
        owner=owner,
    )
    with store.writing(record) as staging:
        if fmt == "merged":
            model.save_pretrained(staging, safe_serialization=True)
            _copy_tokenizer(folder, staging)
        else:
            write_gguf(model, folder, staging / f"{name}.gguf", gguf_type)
    return store.get(name)


def merged_model(location: str, kwargs: dict, adapter_dir: Path, dtype: str):
    """The base with the adapter merged in, as a plain transformers model (no peft layers left)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = TORCH_DTYPES.get(dtype, "auto")  # auto: the checkpoint's own dtype
    base = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, use_safetensors=True, **kwargs)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.eval()
    return model


def _base_entry(settings: Settings, info: AdapterInfo) -> ModelEntry:
    for entry in settings.models:
        if entry.kind == "llm" and info.base_model in (entry.name, entry.source):
            return entry
    raise FailedPrecondition(
        f"adapter {info.name!r} was trained on {info.base_model!r}, which this server's models do not include"
    )


def _copy_tokenizer(source: Path, target: Path) -> None:
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, target / file)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)
