"""LoRA adapters for one served model: resolved by name from the store, loaded on first use, kept in an LRU.

Loaded adapters occupy slots of the model's batched multi-LoRA layers (`services.llm.lora`). All
loading and eviction happens on the engine thread between steps, so weights never change under a
running forward pass. Adapters in use by running sequences are pinned and never evicted; if every slot
is pinned, the slots grow.

Every acquire reads the adapter's metadata from the store (one small file), so a deleted adapter is
refused and a replaced one (a new `version`) is loaded afresh: a slot is keyed by name and version, and
sequences still running on the old version finish on it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from services.llm import metrics
from services.llm.lora import MultiLora
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition, ServiceError

log = logging.getLogger(__name__)


AdapterKey = tuple[str, str]  # (name, version): what a loaded slot holds


class LoraAdapterCache:
    def __init__(self, model, store: AdapterStore, capacity: int, model_name: str, model_source: str):
        self._store = store
        self._capacity = capacity
        self._model_name = model_name
        self._model_source = model_source
        self._lora = MultiLora(model, slots=capacity)
        self._slots: OrderedDict[AdapterKey, int] = OrderedDict()  # least recently used first
        self._users: dict[AdapterKey, int] = {}  # running sequences per loaded adapter

    def resolve(self, name: str) -> AdapterInfo:
        """Check that adapter `name` exists and fits this model (any thread)."""
        return self._store.get_for(name, "llm", (self._model_name, self._model_source))

    @property
    def loaded(self) -> list[str]:
        return [name for name, _ in self._slots]

    def acquire(self, name: str) -> AdapterKey:
        """Load the store's current version of `name` if needed and pin it for one sequence (engine thread)."""
        key = (name, self.resolve(name).version)
        if key not in self._slots:
            key = self._load(name, key)
        self._users[key] += 1
        self._slots.move_to_end(key)
        return key

    def release(self, key: AdapterKey) -> None:
        if key in self._users:
            self._users[key] -= 1

    def set_rows(self, keys: list[AdapterKey | None]) -> None:
        """Point each row of the next forward at its adapter's slot (None: the base model)."""
        self._lora.set_rows([self._slots[k] if k else None for k in keys])

    def _load(self, name: str, key: AdapterKey) -> AdapterKey:
        self._evict_unused(keep=self._capacity - 1)
        slot = self._free_slot()
        for _attempt in range(2):  # the adapter may be replaced while its files are read: read it again
            try:
                self._lora.load(slot, self._store.path(name))
            except ServiceError:
                self._lora.clear(slot)
                raise
            except Exception as exc:  # unreadable or truncated files and the like
                self._lora.clear(slot)
                log.warning("adapter load failed", extra={"adapter": name, "error": repr(exc)})
                raise FailedPrecondition(
                    f"adapter {name!r} could not be loaded: its files are missing, unreadable or not a PEFT LoRA "
                    "adapter for this model; save it again"
                ) from exc
            current = (name, self.resolve(name).version)
            if current == key:
                break
            key = current
        self._slots[key] = slot
        self._users[key] = 0
        metrics.ADAPTER_LOADS.labels(self._model_name).inc()
        metrics.ADAPTERS_LOADED.labels(self._model_name).set(len(self._slots))
        log.info("adapter loaded", extra={"adapter": name, "version": key[1], "model": self._model_name, "slot": slot})
        return key

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        return next(s for s in range(len(used) + 1) if s not in used)

    def _evict_unused(self, keep: int) -> None:
        for key in [k for k in self._slots if self._users[k] == 0]:
            if len(self._slots) <= keep:
                break
            self._lora.clear(self._slots.pop(key))
            del self._users[key]
            metrics.ADAPTER_EVICTIONS.labels(self._model_name).inc()
            log.info("adapter evicted", extra={"adapter": key[0], "version": key[1], "model": self._model_name})
