"""The models of one kind that a server hosts: loaded after the port is up, looked up by name per request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from shared.errors import Unavailable
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, ModelKind, Settings

log = logging.getLogger(__name__)


class Served(Protocol):
    def shutdown(self) -> None: ...


T = TypeVar("T", bound=Served)


class ModelHost(Generic[T]):
    """`load(entry)` turns a configured model into a started, served one; the host owns them all."""

    def __init__(self, settings: Settings, kind: ModelKind, load: Callable[[ModelEntry], T]):
        self.registry = ModelRegistry(settings.models, kind)
        self._load = load
        self._served: dict[str, T] = {}

    def load_all(self) -> None:
        for entry in self.registry.entries():
            self._served[entry.name] = self._load(entry)
            log.info("model ready", extra={"model": entry.name})

    def get(self, name: str) -> T:
        """The served model `name` (empty: the default); NOT_FOUND if unknown, UNAVAILABLE while loading."""
        entry = self.registry.get(name)
        served = self._served.get(entry.name)
        if served is None:
            raise Unavailable(f"model {entry.name!r} is still loading; retry shortly")
        return served

    def entries(self) -> list[tuple[ModelEntry, T | None]]:
        return [(e, self._served.get(e.name)) for e in self.registry.entries()]

    def shutdown(self) -> None:
        for served in self._served.values():
            served.shutdown()
