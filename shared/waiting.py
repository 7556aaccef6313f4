"""The queue of requests waiting for an engine thread: bounded, closable, and fair to live clients.

Submitters call `put`; the engine thread waits on `cond` and takes from `items` while holding it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from shared.errors import ResourceExhausted, Unavailable


class Cancellable(Protocol):
    cancelled: bool


T = TypeVar("T", bound=Cancellable)

SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class WaitingQueue(Generic[T]):
    def __init__(self, model_name: str, capacity: int, on_size: Callable[[int], None]):
        self.model_name = model_name
        self.capacity = capacity
        self.cond = threading.Condition()
        self.items: deque[T] = deque()
        self.closed = False
        self._on_size = on_size

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: T) -> None:
        """Queue `item`, or raise UNAVAILABLE when closed and RESOURCE_EXHAUSTED when full."""
        with self.cond:
            if self.closed:
                raise Unavailable(SHUTTING_DOWN)
            if len(self.items) >= self.capacity:  # clients that went away do not hold slots
                self.items = deque(i for i in self.items if not i.cancelled)
            if len(self.items) >= self.capacity:
                raise ResourceExhausted(
                    f"the queue of model {self.model_name!r} is full ({self.capacity} waiting requests); retry later"
                )
            self.items.append(item)
            self.publish()
            self.cond.notify()

    def publish(self) -> None:
        """Report the queue length (call with `cond` held after taking items)."""
        self._on_size(len(self.items))

    def close(self) -> None:
        """Refuse new items and wake the engine so it can stop."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drain(self) -> list[T]:
        with self.cond:
            items, self.items = list(self.items), deque()
            self.publish()
        return items
