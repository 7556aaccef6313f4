"""What can be exported and how, checked in one place (torch-free): the fine-tune API checks a request before
it starts the export's process, and the export command checks it again for its own callers."""

from __future__ import annotations

from shared.adapters import AdapterInfo
from shared.errors import FailedPrecondition, InvalidArgument

FORMATS = ("merged", "gguf")
GGUF_TYPES = ("F16", "BF16", "Q8_0")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # merged: auto is the base checkpoint's own


def check_exportable(info: AdapterInfo) -> None:
    if info.kind != "llm":
        raise FailedPrecondition(f"adapter {info.name!r} is a {info.kind} adapter; only LLM adapters are exported")
    if info.method == "p_tuning":
        raise FailedPrecondition(
            f"adapter {info.name!r} is p-tuning: virtual-token embeddings put before each prompt, not a change to "
            "any weight, so it cannot be merged; serve it with ModelWorks, or train a LoRA adapter to export"
        )


def check_format(fmt: str, gguf_type: str, dtype: str) -> None:
    """`gguf_type` applies to GGUF exports and `dtype` to merged ones; the other is left at its default."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"the export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if gguf_type not in GGUF_TYPES:
        raise InvalidArgument(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt == "merged" and gguf_type != "F16":
        raise InvalidArgument("gguf_type applies to GGUF exports; leave it empty for a merged export")
    if fmt == "gguf" and dtype != "auto":
        raise InvalidArgument("dtype applies to merged exports; a GGUF export's types are gguf_type")


def default_name(adapter: str, fmt: str, gguf_type: str) -> str:
    return f"{adapter}-merged" if fmt == "merged" else f"{adapter}-{gguf_type.lower()}"
