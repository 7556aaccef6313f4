"""Deliver events from a worker thread (an engine) into asyncio queues on the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol


class LoopBridge:
    """Thread-safe `put(queue, item)` for queues owned by one event loop.

    An engine step often produces items for many requests at once (a token for every running sequence);
    they are handed over with a single loop wake-up instead of one per item.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, item: Any) -> None:  # any thread
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:
                return  # a drain is already scheduled
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone, and so is the client
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class EngineEvent(Protocol):
    error: Exception | None

    @property
    def final(self) -> bool: ...


class EventRelay:
    """Per servicer: hands each request a thread-safe event sink, then relays its events to the RPC.

    The bridge is made on first use because the servicer is built before the server's loop runs.
    """

    def __init__(self) -> None:
        self._bridge: LoopBridge | None = None

    def sink(self) -> tuple[asyncio.Queue, Callable[[Any], None]]:
        if self._bridge is None:
            self._bridge = LoopBridge(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()
        return queue, functools.partial(self._bridge.put, queue)

    @staticmethod
    async def follow(queue: asyncio.Queue, cancel: Callable[[], None]) -> AsyncIterator[Any]:
        """Yield events up to the final one, raising an event's error; `cancel` runs however it ends
        (a client that goes away frees its engine slot)."""
        try:
            while True:
                event: EngineEvent = await queue.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.final:
                    return
        finally:
            cancel()
