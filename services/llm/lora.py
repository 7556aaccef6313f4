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

Every slot of a layer has the rank of the largest adapter loaded, so one adapter's rank is paid by all slots
of all layers: ranks above `llm.max_lora_rank` are refused at load, and so are lm_head and the embeddings
as targets (a vocabulary-sized slot) unless `llm.allow_embedding_lora_targets`. The slot buffers hold
bytes in the engine's KV budget (`SlotKV.hold`), and a re-layout is all or nothing: every new buffer is
allocated before any layer takes its own, so a failure leaves every loaded adapter as it was.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from shared.devices import is_fatal_device_error
from shared.errors import FailedPrecondition, ResourceExhausted
from shared.quantization import activation_dtype, dense_weight

if TYPE_CHECKING:
    from services.llm.kv_slots import SlotKV
    from shared.settings import LLMSettings

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_MAGNITUDE_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_EMBEDDING_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.[^.]+)?$")
MiB = 2**20


@dataclass(frozen=True)
class LoraLimits:
    """What an adapter may ask of the server (the defaults are the settings' defaults)."""

    max_rank: int = 64  # llm.max_lora_rank
    allow_embedding_targets: bool = False  # llm.allow_embedding_lora_targets

    @classmethod
    def from_settings(cls, settings: LLMSettings) -> LoraLimits:
        return cls(settings.max_lora_rank, settings.allow_embedding_lora_targets)


DEFAULT_LIMITS = LoraLimits()


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
    """m / ‖W₀ + s·BA‖ per output feature (peft's DoRA; the scaling is already in B), in float32; a quantized
    base's W₀ is its dequantized weight, as peft computes it."""
    adapted = base_weight.float() + weights.B.float().to(base_weight.device) @ weights.A.float().to(base_weight.device)
    return weights.magnitude.float().to(base_weight.device) / torch.linalg.norm(adapted, dim=1)


class MultiLoraLinear(nn.Module):
    """A linear layer (plain or quantized) with every slot's LoRA; the slots are in `dtype`, the model's
    compute dtype."""

    def __init__(self, base: nn.Linear, state: LoraBatchState, slots: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.state = state
        factory = {"device": base.weight.device, "dtype": dtype}
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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.lora_A, self.lora_B, self.dora_scale))

    @property
    def slots(self) -> int:
        return self.dora_scale.shape[0] - 1

    def relaid(self, slots: int, rank: int, old_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New stacked weights for `slots` slots of rank `rank`, holding the loaded ones; `adopt` puts them
        in. Nothing of this layer changes here, so a failure midway leaves it as it was."""
        A = self.lora_A.new_zeros(slots * rank, self.base.in_features)
        B = self.lora_B.new_zeros(self.base.out_features, slots * rank)
        scale = self.dora_scale.new_ones(slots + 1, self.base.out_features)
        for s in range(min(self.slots, slots)):
            if old_rank:
                A[s * rank : s * rank + old_rank] = self.lora_A[s * old_rank : (s + 1) * old_rank]
                B[:, s * rank : s * rank + old_rank] = self.lora_B[:, s * old_rank : (s + 1) * old_rank]
            scale[s] = self.dora_scale[s]
        return A, B, scale

    def adopt(self, buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.lora_A, self.lora_B, self.dora_scale = buffers
        self._views = None  # they point into the old buffers, which the budget now counts as freed

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
            self.dora_scale[slot] = dora_factor(dense_weight(self.base), weights).to(self.dora_scale)


@dataclass
class _Layout:
    """A re-layout's buffers, all allocated before any layer takes its own."""

    wrapped: dict[str, MultiLoraLinear]  # newly targeted layers, not yet in the model
    relaid: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # the wrapped layers' new A, B, DoRA scale
    columns_slot: torch.Tensor


class MultiLora:
    """Owns the wrapped layers of one model and the slots adapters are loaded into."""

    def __init__(self, model: nn.Module, slots: int, limits: LoraLimits = DEFAULT_LIMITS):
        self.model = model
        self.state = LoraBatchState()
        self.slots = slots
        self.rank = 0
        self.limits = limits
        self.budget: SlotKV | None = None  # the KV cache whose budget the slot buffers share; None: unbounded
        self.layers: dict[str, MultiLoraLinear] = {}
        self._columns_slot: torch.Tensor | None = None
        self._dora_slots: set[int] = set()

    @property
    def nbytes(self) -> int:
        """Bytes of the slot buffers of every wrapped layer."""
        return sum(layer.nbytes for layer in self.layers.values())

    def share_budget(self, kv: SlotKV) -> None:
        """Hold the slot buffers' bytes in `kv`'s budget from now on (they grow only through `_relayout`)."""
        if not kv.hold(self.nbytes):
            raise ValueError(f"the loaded LoRA slots ({self.nbytes} bytes) do not fit the KV cache budget")
        self.budget = kv

    def load(self, slot: int, adapter_dir: Path) -> None:
        """Read a PEFT LoRA/DoRA adapter and write it into `slot`; FailedPrecondition if it cannot apply,
        ResourceExhausted if its slots do not fit the memory."""
        weights = read_peft_lora(adapter_dir, self.model, self.limits)
        slots = max(self.slots, slot + 1)
        rank = max(self.rank, *(w.A.shape[0] for w in weights.values()))
        targets = sorted(weights.keys() - self.layers.keys())
        if (slots, rank) != (self.slots, self.rank) or targets:
            self._relayout(adapter_dir.name, slots, rank, targets)
        for name, layer in self.layers.items():
            layer.write_slot(slot, self.rank, weights.get(name))
        if any(w.magnitude is not None for w in weights.values()):
            self._dora_slots.add(slot)
        else:
            self._dora_slots.discard(slot)

    def clear(self, slot: int) -> None:
        if slot >= self.slots:  # a load that could not grow the slots to it
            return
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

    def _relayout(self, adapter: str, slots: int, rank: int, targets: list[str]) -> None:
        """Lay the wrapped layers, and the newly `targets`ed ones, out for `slots` slots of rank `rank`,
        all or nothing: the new buffers are booked in the budget and allocated for every layer before any
        layer takes its own (the old ones live until then, so both are booked meanwhile)."""
        held, needed = self.nbytes, self._layout_bytes(slots, rank, targets)
        if self.budget is not None and not self.budget.hold(held + needed):
            raise self._over_budget(adapter, slots, rank, held + needed)
        try:
            layout = self._allocate(slots, rank, targets)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if is_fatal_device_error(exc):
                raise
            log.warning("LoRA re-layout failed", extra={"adapter": adapter, "rank": rank, "error": repr(exc)})
            layout = None  # raised below, outside this block: the error keeps no frame of the partial buffers
        if layout is None:
            if self.budget is not None:
                self.budget.hold(held)
            _release_cached_memory(self._device)
            raise ResourceExhausted(
                f"not enough memory to lay out LoRA slots of rank {rank} ({slots} slots, {needed / MiB:.1f} MiB) "
                f"for adapter {adapter!r}; the loaded adapters are unchanged. Lower the adapter's rank "
                "(llm.max_lora_rank) or llm.adapter_cache_size"
            )
        self._adopt(layout, slots, rank)
        if self.budget is not None:
            self.budget.hold(needed)

    def _allocate(self, slots: int, rank: int, targets: list[str]) -> _Layout:
        """Every buffer of the new layout; nothing of the model changes here."""
        return _Layout(
            wrapped={
                name: MultiLoraLinear(self._target(name), self.state, slots, rank, self._dtype) for name in targets
            },
            relaid={name: layer.relaid(slots, rank, self.rank) for name, layer in self.layers.items()},
            columns_slot=torch.arange(slots, device=self._device).repeat_interleave(rank),
        )

    def _adopt(self, layout: _Layout, slots: int, rank: int) -> None:
        """Swap a complete layout in (no allocation, so nothing here can fail halfway)."""
        for name, buffers in layout.relaid.items():
            self.layers[name].adopt(buffers)
        for name, layer in layout.wrapped.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        self.slots, self.rank, self._columns_slot = slots, rank, layout.columns_slot

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return activation_dtype(self.model)

    def _target(self, name: str) -> nn.Linear:
        parent_name, _, child = name.rpartition(".")
        return getattr(self.model.get_submodule(parent_name), child)

    def _layout_bytes(self, slots: int, rank: int, targets: list[str]) -> int:
        """Bytes of the slot buffers for `slots` slots of rank `rank` in the wrapped and `targets` layers."""
        bases = [layer.base for layer in self.layers.values()] + [self._target(name) for name in targets]
        itemsize = self._dtype.itemsize
        return sum(
            (slots * rank * (base.in_features + base.out_features) + (slots + 1) * base.out_features) * itemsize
            for base in bases
        )

    def _over_budget(self, adapter: str, slots: int, rank: int, nbytes: int) -> ResourceExhausted:
        kv = self.budget
        return ResourceExhausted(
            f"adapter {adapter!r} needs LoRA slots of rank {rank} ({slots} slots): {nbytes / MiB:.1f} MiB while "
            f"they are laid out, next to {kv.reserved_bytes() / MiB:.1f} MiB of running requests' KV cache, past "
            f"the budget of llm.kv_cache_bytes ({kv.budget_bytes / MiB:.1f} MiB); lower the "
            "adapter's rank, retry when fewer requests run, or raise llm.kv_cache_bytes"
        )


def read_peft_lora(adapter_dir: Path, model: nn.Module, limits: LoraLimits = DEFAULT_LIMITS) -> dict[str, LayerWeights]:
    """Module name -> its LoRA (or DoRA) weights of a PEFT adapter, checked against `model`'s layers and
    `limits` (from the file's header, before its tensors are read)."""
    config = _read_config(adapter_dir)
    weights_file = str(adapter_dir / "adapter_model.safetensors")
    with safe_open(weights_file, framework="pt") as weights:  # one open: the header, then the tensors
        names = weights.keys()  # a safe_open handle is not iterable
        _check_limits(adapter_dir.name, config, {k: weights.get_slice(k).get_shape() for k in names}, model, limits)
        tensors = {key: weights.get_tensor(key) for key in names}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if match := _MAGNITUDE_RE.match(key):
            pairs.setdefault(match["module"], {})["m"] = tensor
        elif match := _KEY_RE.match(key):
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        elif match := _EMBEDDING_RE.match(key):
            raise FailedPrecondition(
                f"the adapter has LoRA on the embedding layer {match['module']!r}; only linear layers can be served"
            )
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


def _read_config(adapter_dir: Path) -> dict:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"adapter type {config.get('peft_type')!r} is not a LoRA adapter")
    unsupported = [k for k in ("modules_to_save",) if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise FailedPrecondition(f"LoRA options {', '.join(unsupported)} are not supported for serving")
    return config


def _check_limits(adapter: str, config: dict, shapes: dict[str, list[int]], model: nn.Module, limits: LoraLimits):
    """Refuse a rank past llm.max_lora_rank (the config's `r` and `rank_pattern`, and the weights' own), and
    embedding or output-head targets unless llm.allow_embedding_lora_targets: every slot of every adapted
    layer takes the largest rank loaded, and a slot of those layers is vocabulary-sized."""
    targets = {}  # module name -> the rank of its lora_A
    for key, shape in shapes.items():
        if (match := _KEY_RE.match(key) or _EMBEDDING_RE.match(key)) and match["which"] == "A" and shape:
            targets[match["module"]] = shape[0]
    ranks = [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values()), *targets.values()]
    if max(ranks) > limits.max_rank:
        raise FailedPrecondition(
            f"adapter {adapter!r} has LoRA rank {max(ranks)}; this server serves ranks up to {limits.max_rank} "
            "(llm.max_lora_rank), since every slot of every adapted layer takes the largest rank loaded; train it "
            "with a smaller lora_r"
        )
    if limits.allow_embedding_targets:
        return
    embeddings = sorted(targets.keys() & _embedding_modules(model))
    if embeddings:
        raise FailedPrecondition(
            f"adapter {adapter!r} targets {embeddings[0]!r}, an embedding or output layer, whose LoRA slots are "
            "vocabulary-sized; this server refuses such targets unless llm.allow_embedding_lora_targets is true; "
            f"train it without {embeddings[0]!r} in target_modules"
        )


def _embedding_modules(model: nn.Module) -> set[str]:
    """Names of the input embeddings, the output head and any nn.Embedding of `model`."""
    heads = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    heads = {id(_unwrapped(m)) for m in heads if m is not None}
    return {n for n, m in model.named_modules() if isinstance(m, nn.Embedding) or id(_unwrapped(m)) in heads}


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, MultiLoraLinear) else module


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank/alpha patterns: a key applies to module names that end with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", name):
            return value
    return default
