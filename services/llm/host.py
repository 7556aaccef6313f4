"""The models one LLM server hosts: loaded at start-up, looked up by name per request."""

from __future__ import annotations

import logging

from services.llm.served import ServedLLM
from shared.adapters import AdapterStore
from shared.errors import Unavailable
from shared.loaders import load_causal_lm
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)


class ModelHost:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = ModelRegistry(settings.models, "llm")
        self.store = AdapterStore(settings.adapters_dir)
        self._served: dict[str, ServedLLM] = {}

    def load_all(self) -> None:
        for entry in self.registry.entries():
            served = ServedLLM(load_causal_lm(entry, self.settings), self.settings.llm, self.store)
            served.start()
            self._served[entry.name] = served
            log.info("model ready", extra={"model": entry.name, "context_length": served.context_length})

    def get(self, name: str) -> ServedLLM:
        entry = self.registry.get(name)  # NotFound for unknown names
        served = self._served.get(entry.name)
        if served is None:
            raise Unavailable(f"model {entry.name!r} is still loading; retry shortly")
        return served

    def entries(self) -> list[tuple[ModelEntry, ServedLLM | None]]:
        return [(e, self._served.get(e.name)) for e in self.registry.entries()]

    def shutdown(self) -> None:
        for served in self._served.values():
            served.shutdown()
