"""Batched multi-LoRA: every row of a batch can use a different adapter, in one forward pass.

peft's mixed-batch mode loops over adapters and sub-batches in every layer, which costs more than the
model itself on small batches. Here, as in Punica / S-LoRA, each targeted `nn.Linear` holds the
adapters of all slots side by side:

    A: (S·r, in)   the slots' lora_A matrices stacked (ranks padded with zeros to r)
    B: (out, S·r)  the slots' lora_B matrices, side by side, pre-multiplied by their scaling

and a step computes  y = base(x) + ((x @ Aᵀ) ⊙ mask) @ Bᵀ,  where the per-row mask (B, 1, S·r) keeps
only the columns of that row's slot. Two small matmuls per layer, whatever the mix of adapters.

DoRA (peft's `use_dora`) rescales each output feature of the adapted weight to a learned magnitude m:
y = (m / ‖W₀ + s·BA‖_row) ⊙ (x·W₀ᵀ + s·x·Aᵀ·Bᵀ) + bias. The norm depends only on the adapter, so each
slot's factor g = m / ‖W₀ + s·BA‖_row is computed once at load; a forward whose batch has a DoRA row
multiplies each row by its slot's g (ones for LoRA slots and the base model). rsLoRA is LoRA with the
scaling alpha/√r. Adapters are read from PEFT's format (`adapter_config.json`, `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from shared.errors import FailedPrecondition

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_MAGNITUDE_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


class LoraBatchState:
    """Which slot each row of the current forward uses; shared by every wrapped layer."""

    def __init__(self) -> None:
        # (B, 1, C) per row, or (1, N, C) per token of a packed row, C = r × (the highest slot used + 1);
        # None when all use the base model
        self.mask: torch.Tensor | None = None
        self.scale_rows: torch.Tensor | None = None  # (B,) or (N,) slot (base: the ones-row), DoRA only
        self.packed = False


@dataclass(frozen=True)
class LayerWeights:
    """One adapted layer: A (r, in), B·scaling (out, r), and DoRA's magnitude (out,) if it has one."""

    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None


def dora_factor(base_weight: torch.Tensor, weights: LayerWeights) -> torch.Tensor:
    """m / ‖W₀ + s·BA‖ per output feature (peft's DoRA; the scaling is already in B), in float32."""
    adapted = base_weight.float() + weights.B.float().to(base_weight.device) @ weights.A.float().to(base_weight.device)
    return weights.magnitude.float().to(base_weight.device) / torch.linalg.norm(adapted, dim=1)


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, state: LoraBatchState, slots: int, rank: int):
        super().__init__()
        self.base = base
        self.state = state
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_A", torch.zeros(slots * rank, base.in_features, **factory), persistent=False)
        self.register_buffer("lora_B", torch.zeros(base.out_features, slots * rank, **factory), persistent=False)
        # DoRA factors: row s is slot s's m/‖W₀+s·BA‖ (ones for LoRA slots); the last row is the base's ones
        self.register_buffer("dora_scale", torch.ones(slots + 1, base.out_features, **factory), persistent=False)
        self._views: tuple[torch.Tensor, ...] | None = None  # (the A they view, A[:columns], B[:, :columns]ᵀ)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask = self.state.mask
        if mask is None:
            return y
        columns = mask.shape[-1]  # the slots up to the highest one this forward uses; those past it are idle
        A, B_t = self._weights(columns)
        h = F.linear(x, A).mul_(mask)  # (B, T, columns); a fresh product, masked in place
        if y.is_contiguous():  # a Linear's fresh output: the product is added in the same op (one op less)
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, columns), B_t)
        else:
            y = y + h @ B_t
        if self.state.scale_rows is None:
            return y
        scale = self.dora_scale.index_select(0, self.state.scale_rows)
        scale = scale[None] if self.state.packed else scale[:, None, :]  # (1, N, out) or (B, 1, out)
        if self.base.bias is None:
            return y * scale
        return (y - self.base.bias) * scale + self.base.bias

    def _weights(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:columns] and B[:, :columns]ᵀ. The views are kept from forward to forward while the buffers are
        the same tensors (slots are written in place): slicing anew each time cost a tiny model's forward
        about a tenth more with adapters."""
        views = self._views
        if views is None or views[0] is not self.lora_A or views[1].shape[0] != columns:
            views = self._views = (self.lora_A, self.lora_A[:columns], self.lora_B[:, :columns].T)
        return views[1], views[2]

    def resize(self, slots: int, rank: int, old_rank: int) -> None:
        """Re-lay the stacked weights for `slots` slots of rank `rank`, keeping the loaded ones."""
        old_slots = self.dora_scale.shape[0] - 1
        A = self.lora_A.new_zeros(slots * rank, self.base.in_features)
        B = self.lora_B.new_zeros(self.base.out_features, slots * rank)
        scale = self.dora_scale.new_ones(slots + 1, self.base.out_features)
        for s in range(min(old_slots, slots)):
            if old_rank:
                A[s * rank : s * rank + old_rank] = self.lora_A[s * old_rank : (s + 1) * old_rank]
                B[:, s * rank : s * rank + old_rank] = self.lora_B[:, s * old_rank : (s + 1) * old_rank]
            scale[s] = self.dora_scale[s]
        self.lora_A, self.lora_B, self.dora_scale = A, B, scale

    def write_slot(self, slot: int, rank: int, weights: LayerWeights | None) -> None:
        """Put an adapter's layer in `slot`, or clear the slot when `weights` is None."""
        block = slice(slot * rank, (slot + 1) * rank)
        self.lora_A[block] = 0
        self.lora_B[:, block] = 0
        self.dora_scale[slot] = 1
        if weights is None:
            return
        r = weights.A.shape[0]
        self.lora_A[slot * rank : slot * rank + r] = weights.A.to(self.lora_A)
        self.lora_B[:, slot * rank : slot * rank + r] = weights.B.to(self.lora_B)
        if weights.magnitude is not None:
            self.dora_scale[slot] = dora_factor(self.base.weight, weights).to(self.dora_scale)


class MultiLora:
    """Owns the wrapped layers of one model and the slots adapters are loaded into."""

    def __init__(self, model: nn.Module, slots: int):
        self.model = model
        self.state = LoraBatchState()
        self.slots = slots
        self.rank = 0
        self.layers: dict[str, MultiLoraLinear] = {}
        self._columns_slot: torch.Tensor | None = None
        self._dora_slots: set[int] = set()

    def load(self, slot: int, adapter_dir: Path) -> None:
        """Read a PEFT LoRA/DoRA adapter and write it into `slot`; FailedPrecondition if it cannot apply."""
        weights = read_peft_lora(adapter_dir, self.model)
        rank = max(w.A.shape[0] for w in weights.values())
        if rank > self.rank or slot >= self.slots:
            self._resize(max(self.slots, slot + 1), max(rank, self.rank))
        for name in weights.keys() - self.layers.keys():
            self._wrap(name)
        for name, layer in self.layers.items():
            layer.write_slot(slot, self.rank, weights.get(name))
        if any(w.magnitude is not None for w in weights.values()):
            self._dora_slots.add(slot)
        else:
            self._dora_slots.discard(slot)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.write_slot(slot, self.rank, None)
        self._dora_slots.discard(slot)

    def set_rows(self, row_slots: list[int | None], packed: bool = False) -> None:
        """Choose each row's slot for the next forward (None: the base model); `packed`: the forward is one
        packed row and `row_slots` has an entry per token."""
        self.state.packed = packed
        if not self.layers or all(s is None for s in row_slots):
            self.state.mask = self.state.scale_rows = None
            return
        device = next(iter(self.layers.values())).lora_A.device
        dtype = next(iter(self.layers.values())).lora_A.dtype
        rows = torch.tensor([-1 if s is None else s for s in row_slots], device=device)
        columns = (max(s for s in row_slots if s is not None) + 1) * self.rank  # slots past the highest: unused
        mask = (rows[:, None] == self._columns_slot[None, :columns]).to(dtype)
        self.state.mask = mask[None] if packed else mask[:, None, :]
        if any(s in self._dora_slots for s in row_slots):
            self.state.scale_rows = torch.where(rows < 0, self.slots, rows)  # base rows: the ones-row
        else:
            self.state.scale_rows = None

    def _wrap(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        layer = MultiLoraLinear(getattr(parent, child), self.state, self.slots, self.rank)
        setattr(parent, child, layer)
        self.layers[name] = layer

    def _resize(self, slots: int, rank: int) -> None:
        for layer in self.layers.values():
            layer.resize(slots, rank, self.rank)
        self.slots, self.rank = slots, rank
        device = next(self.model.parameters()).device
        self._columns_slot = torch.arange(slots, device=device).repeat_interleave(rank)


def read_peft_lora(adapter_dir: Path, model: nn.Module) -> dict[str, LayerWeights]:
    """Module name -> its LoRA (or DoRA) weights of a PEFT adapter, checked against `model`'s layers."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"adapter type {config.get('peft_type')!r} is not a LoRA adapter")
    unsupported = [k for k in ("modules_to_save",) if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise FailedPrecondition(f"LoRA options {', '.join(unsupported)} are not supported for serving")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if match := _MAGNITUDE_RE.match(key):
            pairs.setdefault(match["module"], {})["m"] = tensor
        elif match := _KEY_RE.match(key):
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        else:
            raise FailedPrecondition(f"the adapter has a weight this server cannot apply: {key}")
    modules = dict(model.named_modules())
    out = {}
    for name, parts in pairs.items():
        module = modules.get(name)
        if isinstance(module, MultiLoraLinear):
            module = module.base
        if not isinstance(module, nn.Linear) or not {"A", "B"} <= set(parts):
            raise FailedPrecondition(f"the adapter's layer {name!r} does not match a linear layer of the model")
        A, B, magnitude = parts["A"], parts["B"], parts.get("m")
        r = A.shape[0]
        if A.shape != (r, module.in_features) or B.shape != (module.out_features, r):
            raise FailedPrecondition(f"the adapter's layer {name!r} has shapes that do not fit the model")
        if magnitude is not None and magnitude.reshape(-1).shape != (module.out_features,):
            raise FailedPrecondition(f"the adapter's DoRA magnitude of {name!r} does not fit the model")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = LayerWeights(A, B * scaling, None if magnitude is None else magnitude.reshape(-1))
    if not out:
        raise FailedPrecondition("the adapter has no LoRA weights")
    if config.get("use_dora") and any(w.magnitude is None for w in out.values()):
        raise FailedPrecondition("the adapter says it is DoRA but lacks magnitude vectors")
    return out


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank/alpha patterns: a key applies to module names that end with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", name):
            return value
    return default
