"""Device and dtype choice: CUDA gets bf16 (fp16 where bf16 is unsupported), the CPU float32."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} was asked for, but no CUDA device is available")
    return device


def resolve_dtype(preference: str, device: torch.device) -> torch.dtype:
    if preference != "auto":
        dtype = _DTYPES[preference]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported on the CPU; use float32 or bfloat16")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
