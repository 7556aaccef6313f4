"""Quantized base weights: bitsandbytes NF4 and int8 (GPU and CPU), FP8 on GPUs with float8 tensor cores.

One place decides what a `quantization` name means on a device: serving (`shared.loaders`) and QLoRA
training load through `quantization_config`, which refuses what the device cannot run with a message that
says what to use instead. The weights stay quantized; LoRA layers that read the base weight (DoRA's norm,
merging) use `dense_weight`. Torch-free at import (settings and the job API read the names); bitsandbytes
is imported only when a quantized model is asked for.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

from shared.errors import FailedPrecondition

if TYPE_CHECKING:
    import torch
    from torch import nn

QuantizationName = Literal["none", "bnb-nf4", "bnb-int8", "fp8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "bnb-nf4", "bnb-int8", "fp8")
TRAINABLE_QUANTIZATIONS: tuple[str, ...] = ("none", "bnb-nf4", "bnb-int8")  # QLoRA: a frozen bitsandbytes base
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: float8 tensor cores


def quantization_config(
    name: str, device: torch.device, compute_dtype: torch.dtype, keep: list[str] | None = None
) -> Any | None:
    """transformers' quantization config for loading a model as `name` on `device` (None: not quantized).

    NF4 uses double quantization (the block scales quantized too) and computes in `compute_dtype`. `keep`
    names modules left in full precision besides those transformers keeps (the output head): a BERT pooler,
    which an encoder checkpoint may lack and which would then be made after quantizing, without its state."""
    if name == "none":
        return None
    if name == "fp8":
        return _fp8_config(device)
    _require_bitsandbytes(name)
    from transformers import BitsAndBytesConfig

    if name == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=keep,  # the name covers both bitsandbytes modes
        )
    if name == "bnb-int8":
        # its layers cast float32/bf16 inputs to float16 by design, and would warn on every forward
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    raise FailedPrecondition(f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATIONS)}")


def _fp8_config(device: torch.device) -> Any:
    import torch

    if device.type != "cuda":
        raise FailedPrecondition(
            "quantization fp8 needs a GPU with float8 tensor cores (compute capability 8.9 or later: Ada, Hopper) "
            f"and this model loads on {device}; use bnb-nf4 or bnb-int8 there"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise FailedPrecondition(
            "quantization fp8 needs compute capability 8.9 or later (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use bnb-nf4 or bnb-int8"
        )
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config()  # float8 e4m3 weights in 128x128 blocks, activations quantized per token group


def _require_bitsandbytes(name: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise FailedPrecondition(
            f"quantization {name} needs the bitsandbytes package, which this install lacks: pip install "
            f"bitsandbytes ({exc})"
        ) from None


def fit_cpu_kernels(model: nn.Module) -> None:
    """NF4 layers keep bitsandbytes' generic CPU path (dequantize, then matmul in the compute dtype).

    On CPUs with AVX-512 BF16, bitsandbytes would repack each layer on its first inference call for a
    kernel that computes in bfloat16 whatever the compute dtype, and takes only layers with output features
    a multiple of 32 and input features a multiple of the block size (others fail an assert): serving would
    then differ from what training (which never takes that path) computed, and some models would not load."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is not a plain float tensor (bitsandbytes or FP8 packed)."""
    from torch import nn

    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and not weight.is_floating_point()


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The layer's weight as a float tensor (out, in): itself when not quantized, else dequantized."""
    weight = linear.weight
    if weight.is_floating_point():
        return weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, quant_state)
    row_scales = getattr(weight, "SCB", None)
    if row_scales is None:  # a bitsandbytes int8 layer moves its scales to its state on its first forward
        row_scales = getattr(getattr(linear, "state", None), "SCB", None)
    if row_scales is not None:  # bitsandbytes int8: each row scaled to ±127 by its absolute maximum
        return weight.data.float() * (row_scales.float()[:, None] / 127.0)
    scales = getattr(linear, "weight_scale_inv", None)
    if scales is not None:  # FP8 in blocks, one scale per block
        rows, cols = weight.shape
        block_rows, block_cols = -(-rows // scales.shape[0]), -(-cols // scales.shape[1])
        expanded = scales.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
        return weight.float() * expanded.float()
    raise FailedPrecondition(f"cannot read the weight of a {type(linear).__name__} layer ({weight.dtype})")


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its embeddings' (never quantized), whatever its linear layers hold."""
    return model.get_input_embeddings().weight.dtype


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take where they live: parameters, buffers and quantization scales."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.nbytes
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            total += sum(t.nbytes for t in _quant_state_tensors(quant_state))
        row_scales = getattr(tensor, "SCB", None)
        if row_scales is not None:
            total += row_scales.nbytes
    return total


def _quant_state_tensors(state) -> list[torch.Tensor]:
    tensors = [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None]
    nested = getattr(state, "state2", None)
    return tensors + (_quant_state_tensors(nested) if nested is not None else [])
