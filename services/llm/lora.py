"""Batched multi-LoRA: every row of a batch can use a different adapter, in one forward pass.

peft's mixed-batch mode loops over adapters and sub-batches in every layer, which costs more than the
model itself on small batches. Here, as in Punica / S-LoRA, each targeted `nn.Linear` holds the
adapters of all slots side by side:

    A: (S·r, in)   the slots' lora_A matrices stacked (ranks padded with zeros to r)
    B: (out, S·r)  the slots' lora_B matrices, side by side, pre-multiplied by their scaling

and a step computes  y = base(x) + ((x @ Aᵀ) ⊙ mask) @ Bᵀ,  where the per-row mask (B, 1, S·r) keeps
only the columns of that row's slot. Two small matmuls per layer, whatever the mix of adapters.
Adapters are read from PEFT's format (`adapter_config.json`, `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from shared.errors import FailedPrecondition

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class LoraBatchState:
    """Which slot each row of the current forward uses; shared by every wrapped layer."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (B, 1, S·r) or None when every row is the base model


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, state: LoraBatchState, slots: int, rank: int):
        super().__init__()
        self.base = base
        self.state = state
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_A", torch.zeros(slots * rank, base.in_features, **factory), persistent=False)
        self.register_buffer("lora_B", torch.zeros(base.out_features, slots * rank, **factory), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask = self.state.mask
        if mask is None:
            return y
        h = (x @ self.lora_A.T) * mask  # (B, T, S·r)
        return y + h @ self.lora_B.T

    def resize(self, slots: int, rank: int, old_rank: int) -> None:
        """Re-lay the stacked weights for `slots` slots of rank `rank`, keeping the loaded ones."""
        old_slots = self.lora_A.shape[0] // old_rank if old_rank else 0
        A = self.lora_A.new_zeros(slots * rank, self.base.in_features)
        B = self.lora_B.new_zeros(self.base.out_features, slots * rank)
        for s in range(min(old_slots, slots)):
            A[s * rank : s * rank + old_rank] = self.lora_A[s * old_rank : (s + 1) * old_rank]
            B[:, s * rank : s * rank + old_rank] = self.lora_B[:, s * old_rank : (s + 1) * old_rank]
        self.lora_A, self.lora_B = A, B

    def write_slot(self, slot: int, rank: int, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Put an adapter's (r, in) / (out, r) matrices in `slot`, or zeros when A is None."""
        block = slice(slot * rank, (slot + 1) * rank)
        self.lora_A[block] = 0
        self.lora_B[:, block] = 0
        if A is not None:
            r = A.shape[0]
            self.lora_A[slot * rank : slot * rank + r] = A.to(self.lora_A)
            self.lora_B[:, slot * rank : slot * rank + r] = B.to(self.lora_B)


class MultiLora:
    """Owns the wrapped layers of one model and the slots adapters are loaded into."""

    def __init__(self, model: nn.Module, slots: int):
        self.model = model
        self.state = LoraBatchState()
        self.slots = slots
        self.rank = 0
        self.layers: dict[str, MultiLoraLinear] = {}
        self._columns_slot: torch.Tensor | None = None

    def load(self, slot: int, adapter_dir: Path) -> None:
        """Read a PEFT LoRA adapter and write it into `slot`; raises FailedPrecondition if it cannot apply."""
        weights = read_peft_lora(adapter_dir, self.model)
        rank = max(A.shape[0] for A, _ in weights.values())
        if rank > self.rank or slot >= self.slots:
            self._resize(max(self.slots, slot + 1), max(rank, self.rank))
        for name in weights.keys() - self.layers.keys():
            self._wrap(name)
        for name, layer in self.layers.items():
            A, B = weights.get(name, (None, None))
            layer.write_slot(slot, self.rank, A, B)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.write_slot(slot, self.rank, None, None)

    def set_rows(self, row_slots: list[int | None]) -> None:
        """Choose each row's slot for the next forward (None: the base model)."""
        if not self.layers or all(s is None for s in row_slots):
            self.state.mask = None
            return
        device = next(iter(self.layers.values())).lora_A.device
        dtype = next(iter(self.layers.values())).lora_A.dtype
        rows = torch.tensor([-1 if s is None else s for s in row_slots], device=device)
        self.state.mask = (rows[:, None] == self._columns_slot[None, :]).to(dtype)[:, None, :]

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


def read_peft_lora(adapter_dir: Path, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A, B·scaling) of a PEFT LoRA adapter, checked against `model`'s layers."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"adapter type {config.get('peft_type')!r} is not supported; only LoRA is")
    unsupported = [k for k in ("use_dora", "modules_to_save") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise FailedPrecondition(f"LoRA options {', '.join(unsupported)} are not supported for serving")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise FailedPrecondition(f"the adapter has a weight this server cannot apply: {key}")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    modules = dict(model.named_modules())
    out = {}
    for name, pair in pairs.items():
        module = modules.get(name)
        if isinstance(module, MultiLoraLinear):
            module = module.base
        if not isinstance(module, nn.Linear) or set(pair) != {"A", "B"}:
            raise FailedPrecondition(f"the adapter's layer {name!r} does not match a linear layer of the model")
        A, B = pair["A"], pair["B"]
        r = A.shape[0]
        if A.shape != (r, module.in_features) or B.shape != (module.out_features, r):
            raise FailedPrecondition(f"the adapter's layer {name!r} has shapes that do not fit the model")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = (A, B * scaling)
    if not out:
        raise FailedPrecondition("the adapter has no LoRA weights")
    return out


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank/alpha patterns: a key applies to module names that end with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", name):
            return value
    return default
