"""The models of one kind that a server hosts: loaded after the port is up, looked up by name per request."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from shared.errors import Unavailable
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, ModelKind, Settings

log = logging.getLogger(__name__)


class Served(Protocol):
    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None: ...

    def shutdown(self) -> None: ...


T = TypeVar("T", bound=Served)

EngineDeath = Callable[[str, BaseException], None]  # (model name, why its engine stopped)


class ModelHost(Generic[T]):
    """`load(entry)` turns a configured model into a served one, which the host starts and owns.

    `on_engine_death` (set by the server before `load_all`) hears of any engine that stops on its own.
    """

    def __init__(self, settings: Settings, kind: ModelKind, load: Callable[[ModelEntry], T]):
        self.registry = ModelRegistry(settings.models, kind)
        self._load = load
        self._served: dict[str, T] = {}
        self.on_engine_death: EngineDeath | None = None

    def load_all(self) -> None:
        for entry in self.registry.entries():
            served = self._load(entry)
            served.start(on_death=functools.partial(self._engine_died, entry.name))
            self._served[entry.name] = served
            log.info("model ready", extra={"model": entry.name})

    def _engine_died(self, name: str, cause: BaseException) -> None:
        if self.on_engine_death is not None:
            self.on_engine_death(name, cause)

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
        for served in list(self._served.values()):
            served.shutdown()


class ModelHosts:
    """Several hosts (of different kinds) served by one process, loaded, watched and shut down together."""

    def __init__(self, *hosts: ModelHost):
        self.hosts = hosts
        self.on_engine_death: EngineDeath | None = None

    def load_all(self) -> None:
        for host in self.hosts:
            host.on_engine_death = self.on_engine_death
            host.load_all()

    def shutdown(self) -> None:
        for host in self.hosts:
            host.shutdown()
