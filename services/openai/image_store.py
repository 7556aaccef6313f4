"""Images returned as URLs (`response_format: url`), held in memory for a bounded time and a bounded size.

A URL carries an unguessable token, so a browser or `<img>` fetches it with no API key (as OpenAI's signed
URLs work); it expires after `openai.image_url_ttl_s`, and past `openai.image_url_bytes` the oldest go first.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable


class ImageStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, png: bytes) -> str:
        """Hold the PNG; returns its token."""
        self._expire()
        token = secrets.token_urlsafe(24)
        self._images[token] = (self._clock() + self.ttl_s, png)
        self._bytes += len(png)
        while self._bytes > self.max_bytes and len(self._images) > 1:
            self._drop_oldest()
        return token

    def get(self, token: str) -> bytes | None:
        self._expire()
        held = self._images.get(token)
        return held[1] if held else None

    def _expire(self) -> None:
        now = self._clock()
        while self._images and next(iter(self._images.values()))[0] <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, png) = self._images.popitem(last=False)
        self._bytes -= len(png)
