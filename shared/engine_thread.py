"""The thread an engine runs on, with one lifecycle for every engine.

`start` runs the engine's loop on a daemon thread; `stop` closes the waiting queue and joins. However
the loop ends — closed queue, a bug, a fatal device error — its `finally` closes the queue and fails
every request still waiting or running with UNAVAILABLE, so no client waits on a loop that is gone. A
loop that ends other than by `stop` reports its cause to `on_death`, which the server turns into
NOT_SERVING and a non-zero exit (an orchestrator then restarts the process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from shared.errors import ServiceError, Unavailable
from shared.waiting import SHUTTING_DOWN, WaitingQueue

log = logging.getLogger(__name__)

ENGINE_FAILED = "the model's engine stopped after an unrecoverable error; the server is restarting, retry shortly"


class EngineDied(Exception):
    """An engine loop ended on its own; `__cause__` says why."""


class EngineThread:
    def __init__(
        self,
        name: str,
        waiting: WaitingQueue,
        loop: Callable[[], None],
        fail_remaining: Callable[[ServiceError], None],
    ):
        self.name = name
        self._waiting = waiting
        self._loop = loop
        self._fail_remaining = fail_remaining
        self._thread: threading.Thread | None = None
        self._on_death: Callable[[BaseException], None] | None = None
        self._stopping = False

    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        self._on_death = on_death
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Close the queue and wait for the loop; whatever is left gets UNAVAILABLE."""
        self._stopping = True
        self._waiting.close()
        if self._thread is None:
            self._fail_remaining(Unavailable(SHUTTING_DOWN))
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("engine did not stop in time", extra={"engine": self.name, "timeout_s": timeout})
            # its own `finally` fails what is left when it stops; never race it for the same state

    def _run(self) -> None:
        death: BaseException | None = None
        try:
            self._loop()
            if not self._stopping:
                death = EngineDied("the engine loop returned while the server was running")
        except BaseException as exc:
            log.exception("engine loop died; the model refuses new requests", extra={"engine": self.name})
            death = exc
        finally:
            self._waiting.close()  # nothing would serve new submissions any more
            if death is not None and self._on_death is not None:
                self._report(death)  # first, so a client told UNAVAILABLE finds health NOT_SERVING already
            try:
                self._fail_remaining(Unavailable(SHUTTING_DOWN if death is None else ENGINE_FAILED))
            except Exception:
                log.exception("failing the remaining requests failed", extra={"engine": self.name})

    def _report(self, death: BaseException) -> None:
        try:
            self._on_death(death)
        except Exception:
            log.exception("reporting the engine's death failed", extra={"engine": self.name})
