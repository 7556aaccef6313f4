"""LoRA adapters for one served model: resolved by name from the store, loaded on first use, kept in an LRU.

Loaded adapters occupy slots of the model's batched multi-LoRA layers (`services.llm.lora`). All
loading and eviction happens on the engine thread between steps, so weights never change under a
running forward pass. Adapters in use by running sequences are pinned and never evicted; if every slot
is pinned, the slots grow.

A request reads the adapter's metadata once, when it arrives (`resolve`: a deleted adapter is refused
there), and the engine acquires the version it found without reading the store again; a replaced adapter
(a new `version`) is loaded afresh by the requests that find the new version. A slot is keyed by name and
version, and sequences still running on the old version finish on it. A first load reads the version again
after the files, so an adapter replaced while they are read is read again.

P-tuning adapters (peft's `P_TUNING`) hold no layer weights, only virtual-token embeddings that the
engine puts in front of the prompt at prefill; they share the LRU but take no LoRA slot.

The slots' memory is held in the engine's KV budget (`share_budget`). An adapter past `LoraLimits`, or
whose slots would not fit that budget or the memory, is refused at load, and every loaded adapter keeps
serving exactly as before.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import torch
from safetensors.torch import load_file

from services.llm import metrics
from services.llm.kv_slots import SlotKV
from services.llm.lora import DEFAULT_LIMITS, LoraLimits, MultiLora
from shared.adapters import AdapterInfo, AdapterStore, check_fits
from shared.errors import FailedPrecondition, ServiceError

log = logging.getLogger(__name__)


AdapterKey = tuple[str, str]  # (name, version): what a loaded slot holds


class LoraAdapterCache:
    def __init__(
        self,
        model,
        store: AdapterStore,
        capacity: int,
        model_name: str,
        model_source: str,
        limits: LoraLimits = DEFAULT_LIMITS,
    ):
        self._store = store
        self._capacity = capacity
        self._model_name = model_name
        self._model_source = model_source
        self._model = model
        self._lora = MultiLora(model, slots=capacity, limits=limits)
        self._slots: OrderedDict[AdapterKey, int | None] = OrderedDict()  # LRU first; None: a p-tuning adapter
        self._users: dict[AdapterKey, int] = {}  # running sequences per loaded adapter
        self._prompts: dict[AdapterKey, torch.Tensor] = {}  # p-tuning: (virtual tokens, hidden) embeddings

    def resolve(self, name: str, info: AdapterInfo | None = None) -> AdapterInfo:
        """Check that adapter `name` exists and fits this model (any thread); `info`: its metadata, already read."""
        return check_fits(info or self._store.get(name), "llm", (self._model_name, self._model_source))

    def virtual_tokens(self, name: str) -> int:
        """How many virtual tokens adapter `name` puts before a prompt (0 for LoRA adapters; any thread)."""
        try:
            config = json.loads((self._store.path(name) / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return 0  # unreadable: the load itself reports it
        return int(config.get("num_virtual_tokens") or 0) if config.get("peft_type") == "P_TUNING" else 0

    def prefix(self, key: AdapterKey | None) -> torch.Tensor | None:
        """The virtual-token embeddings of a loaded p-tuning adapter, else None."""
        return self._prompts.get(key) if key is not None else None

    def share_budget(self, kv: SlotKV) -> None:
        """Hold the LoRA slots' memory in the KV cache's budget (the engine's, once it has one)."""
        self._lora.share_budget(kv)

    @property
    def lora_bytes(self) -> int:
        return self._lora.nbytes

    @property
    def loaded(self) -> list[str]:
        return [name for name, _ in self._slots]

    def acquire(self, name: str, version: str | None = None) -> AdapterKey:
        """Pin `version` of `name` (the one the request resolved; None: the store's current one) for one
        sequence, loading it first if needed (engine thread)."""
        key = (name, version if version is not None else self.resolve(name).version)
        if key not in self._slots:
            key = self._load(name, key)
        self._users[key] += 1
        self._slots.move_to_end(key)
        return key

    def release(self, key: AdapterKey) -> None:
        if key in self._users:
            self._users[key] -= 1

    def set_rows(self, keys: list[AdapterKey | None], packed: bool = False) -> None:
        """Point each row of the next forward at its adapter's slot (None: the base model); `packed`: one
        packed row, with a key per token."""
        self._lora.set_rows([self._slots[k] if k else None for k in keys], packed)  # p-tuning: None, no LoRA

    def _load(self, name: str, key: AdapterKey) -> AdapterKey:
        self._evict_unused(keep=self._capacity - 1)
        prompt = self.virtual_tokens(name) > 0
        slot = None if prompt else self._free_slot()
        for _attempt in range(2):  # the adapter may be replaced while its files are read: read it again
            try:
                if prompt:
                    self._prompts[key] = self._read_prompt(name)
                else:
                    self._lora.load(slot, self._store.path(name))
            except Exception as exc:
                self._prompts.pop(key, None)
                if slot is not None:
                    self._lora.clear(slot)
                if isinstance(exc, ServiceError):
                    raise
                log.warning("adapter load failed", extra={"adapter": name, "error": repr(exc)})
                raise FailedPrecondition(
                    f"adapter {name!r} could not be loaded: its files are missing, unreadable or not a PEFT "
                    "adapter for this model; save it again"
                ) from exc
            current = (name, self.resolve(name).version)
            if current == key:
                break
            if prompt:
                self._prompts[current] = self._prompts.pop(key)
            key = current
        self._slots[key] = slot
        self._users[key] = 0
        metrics.ADAPTER_LOADS.labels(self._model_name).inc()
        metrics.ADAPTERS_LOADED.labels(self._model_name).set(len(self._slots))
        log.info("adapter loaded", extra={"adapter": name, "version": key[1], "model": self._model_name, "slot": slot})
        return key

    def _read_prompt(self, name: str) -> torch.Tensor:
        embeddings = load_file(str(self._store.path(name) / "adapter_model.safetensors"))["prompt_embeddings"]
        hidden = self._model.get_input_embeddings().embedding_dim
        if embeddings.ndim != 2 or embeddings.shape[1] != hidden:
            raise FailedPrecondition(
                f"adapter {name!r} has virtual tokens of width {embeddings.shape[-1]}; this model's is {hidden}"
            )
        weight = self._model.get_input_embeddings().weight
        return embeddings.to(device=weight.device, dtype=weight.dtype)

    def _free_slot(self) -> int:
        used = {s for s in self._slots.values() if s is not None}
        return next(s for s in range(len(used) + 1) if s not in used)

    def _evict_unused(self, keep: int) -> None:
        for key in [k for k in self._slots if self._users[k] == 0]:
            if len(self._slots) <= keep:
                break
            slot = self._slots.pop(key)
            if slot is None:
                del self._prompts[key]
            else:
                self._lora.clear(slot)
            del self._users[key]
            metrics.ADAPTER_EVICTIONS.labels(self._model_name).inc()
            log.info("adapter evicted", extra={"adapter": key[0], "version": key[1], "model": self._model_name})
