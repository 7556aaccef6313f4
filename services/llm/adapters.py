"""LoRA adapters for one served model: resolved by name from the store, loaded on first use, kept in an LRU.

Loaded adapters occupy slots of the model's batched multi-LoRA layers (`services.llm.lora`). All
loading and eviction happens on the engine thread between steps, so weights never change under a
running forward pass. Adapters in use by running sequences are pinned and never evicted; if every slot
is pinned, the slots grow.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from services.llm import metrics
from services.llm.lora import MultiLora
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition, ServiceError

log = logging.getLogger(__name__)


class LoraAdapterCache:
    def __init__(self, model, store: AdapterStore, capacity: int, model_name: str, model_source: str):
        self._store = store
        self._capacity = capacity
        self._model_name = model_name
        self._model_source = model_source
        self._lora = MultiLora(model, slots=capacity)
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._users: dict[str, int] = {}  # name -> running sequences using it

    def resolve(self, name: str) -> AdapterInfo:
        """Check that adapter `name` exists and fits this model (any thread)."""
        return self._store.get_for(name, "llm", (self._model_name, self._model_source))

    @property
    def loaded(self) -> list[str]:
        return list(self._slots)

    def acquire(self, name: str) -> None:
        """Load `name` if needed and pin it for one sequence (engine thread)."""
        if name not in self._slots:
            self.resolve(name)
            self._evict_unused(keep=self._capacity - 1)
            slot = self._free_slot()
            try:
                self._lora.load(slot, self._store.path(name))
            except ServiceError:
                self._lora.clear(slot)
                raise
            except Exception as exc:  # unreadable files and the like
                self._lora.clear(slot)
                log.warning("adapter load failed", extra={"adapter": name, "error": str(exc)})
                raise FailedPrecondition(f"adapter {name!r} could not be loaded: {exc}") from exc
            self._slots[name] = slot
            self._users[name] = 0
            metrics.ADAPTER_LOADS.labels(self._model_name).inc()
            metrics.ADAPTERS_LOADED.labels(self._model_name).set(len(self._slots))
            log.info("adapter loaded", extra={"adapter": name, "model": self._model_name, "slot": slot})
        self._users[name] += 1
        self._slots.move_to_end(name)

    def release(self, name: str) -> None:
        if name in self._users:
            self._users[name] -= 1

    def set_rows(self, adapters: list[str | None]) -> None:
        """Point each row of the next forward at its adapter's slot (None: the base model)."""
        self._lora.set_rows([self._slots[a] if a else None for a in adapters])

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        return next(s for s in range(len(used) + 1) if s not in used)

    def _evict_unused(self, keep: int) -> None:
        for name in [n for n in self._slots if self._users[n] == 0]:
            if len(self._slots) <= keep:
                break
            self._lora.clear(self._slots.pop(name))
            del self._users[name]
            metrics.ADAPTER_EVICTIONS.labels(self._model_name).inc()
            log.info("adapter evicted", extra={"adapter": name, "model": self._model_name})
