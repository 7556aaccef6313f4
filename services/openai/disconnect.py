"""A unary call whose client goes away is cancelled, as a stream is: its generation stops and frees its slot.

The SDKs time out and retry; without this, every abandoned attempt would run to its end in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from services.openai.errors import APIError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read by then: only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, pending: Awaitable[T]) -> T:
    """`pending`'s result, unless the client goes away first: then `pending` is cancelled."""
    work = asyncio.ensure_future(pending)
    gone = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        raise APIError(499, "the client closed the request before the answer was ready")
    return work.result()
