"""Per-key limits: a token bucket of requests a minute, and a cap on calls in flight.

A key with `requests_per_minute: N` may burst N calls, then gets one more every 60/N seconds; a call past
that is refused with the time until the next token, so a client knows how long to back off. A key with
`max_concurrent_requests: M` may have M calls running (a long generation stream counts until it ends). One
flooding key cannot starve the others: each key drains only its own bucket and its own slots. Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, per_minute: int) -> float:
        """Take one token from `key`'s bucket: 0.0 if the call may go, else the seconds until one is free."""
        rate = per_minute / 60.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(per_minute), now)
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate


class InFlight:
    """Calls in flight per key; `enter` refuses (False) past the key's cap. Used on one event loop."""

    def __init__(self):
        self._counts: dict[str, int] = {}

    def enter(self, key: str, cap: int | None) -> bool:
        count = self._counts.get(key, 0)
        if cap is not None and count >= cap:
            return False
        self._counts[key] = count + 1
        return True

    def leave(self, key: str) -> None:
        count = self._counts[key] - 1
        if count:
            self._counts[key] = count
        else:
            del self._counts[key]
