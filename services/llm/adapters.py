"""LoRA adapters for one served model: resolved by name from the store, loaded on first use, kept in an LRU.

All loading and eviction happens on the engine thread between steps, so the model never changes under
a running forward pass. Adapters in use by running sequences are pinned and never evicted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from services.llm import metrics
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class LoraAdapterCache:
    def __init__(self, model, store: AdapterStore, capacity: int, model_name: str, model_source: str):
        self.model = model  # becomes a PeftModel when the first adapter loads
        self._store = store
        self._capacity = capacity
        self._model_name = model_name
        self._model_source = model_source
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> sequences using it

    def resolve(self, name: str) -> AdapterInfo:
        """Check that adapter `name` exists and fits this model (any thread)."""
        info = self._store.get(name)
        if info.kind != "llm":
            raise FailedPrecondition(f"adapter {name!r} is a {info.kind} adapter, not an LLM adapter")
        if info.base_model not in (self._model_name, self._model_source):
            raise FailedPrecondition(
                f"adapter {name!r} was trained on base model {info.base_model!r}; "
                f"use it with that model, not {self._model_name!r}"
            )
        return info

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def acquire(self, name: str) -> None:
        """Load `name` if needed and pin it for one sequence (engine thread)."""
        if name not in self._loaded:
            self.resolve(name)
            self._load(name)
            self._loaded[name] = 0
            metrics.ADAPTER_LOADS.labels(self._model_name).inc()
        self._loaded[name] += 1
        self._loaded.move_to_end(name)
        self._evict_over_capacity()

    def release(self, name: str) -> None:
        if name in self._loaded:
            self._loaded[name] -= 1

    def _load(self, name: str) -> None:
        from peft import PeftModel

        path = str(self._store.path(name))
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        except Exception as exc:
            log.warning("adapter load failed", extra={"adapter": name, "error": str(exc)})
            raise FailedPrecondition(f"adapter {name!r} could not be loaded into {self._model_name!r}: {exc}") from exc
        self.model.eval()
        if not any(f".{name}." in key for key, _ in self.model.named_parameters()):
            self.model.delete_adapter(name)
            raise FailedPrecondition(f"adapter {name!r} matched no layer of {self._model_name!r}")
        log.info("adapter loaded", extra={"adapter": name, "model": self._model_name})

    def _evict_over_capacity(self) -> None:
        for name in [n for n, users in self._loaded.items() if users == 0]:
            if len(self._loaded) <= self._capacity:
                break
            self.model.delete_adapter(name)
            del self._loaded[name]
            metrics.ADAPTER_EVICTIONS.labels(self._model_name).inc()
            log.info("adapter evicted", extra={"adapter": name, "model": self._model_name})
        metrics.ADAPTERS_LOADED.labels(self._model_name).set(len(self._loaded))
