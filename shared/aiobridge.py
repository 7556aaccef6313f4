"""Deliver events from a worker thread (an engine) into asyncio queues on the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


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
