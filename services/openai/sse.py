"""Server-sent events as OpenAI sends them: `data: <json>` per chunk, `data: [DONE]` at the end, and an
`{"error": ...}` chunk if the generation fails after the response started."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
from fastapi.responses import StreamingResponse

from services.openai import metrics
from services.openai.errors import from_rpc_error
from services.openai.generation import SERVICE, Streams

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _guarded(streams: Streams, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then [DONE]; a failure mid-stream is sent as an error chunk. However the body ends (done,
    failed, or cancelled by a client that went away), the gRPC calls are cancelled and their slots freed."""
    metrics.STREAMS_OPEN.inc()
    try:
        async for chunk in chunks:
            yield chunk
        yield DONE
    except grpc.RpcError as error:
        yield event(from_rpc_error(error, SERVICE).body())
    finally:
        streams.cancel()
        metrics.STREAMS_OPEN.dec()


def sse_response(streams: Streams, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        _guarded(streams, chunks),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
