"""Per-key limits under a flood: one API key floods the LLM service, another measures its time to first token.

(s1) TTFT p50 of a second client (key `app`, one short stream at a time) while key `flood` keeps 64
     streams asking, with the flood key's limits (`max_concurrent_requests` 4, `requests_per_minute`
     6,000), over the same client's TTFT on the idle server; and the same flood from a key with no limits,
     for reference (the batch fills with the flood's rows and every step gets slower).
The flood retries a refused call after 100 ms, as an impatient client would.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import grpc

from bench.report import Row
from tests.harness import spawn_service

APP_KEY, FLOOD_KEY, OPEN_KEY = "app-key-for-the-bench-0001", "flood-key-for-the-bench-01", "open-key-for-the-bench-001"
FLOOD_STREAMS = 64
FLOOD_TOKENS = 512
PROBES = 15
PROBE_TOKENS = 4
MODELS = [{"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm"}]


def _config(workdir: Path) -> dict:
    return {
        "data_dir": str(workdir),
        "models": MODELS,
        "log_level": "WARNING",
        "api_keys": [
            {"name": "app", "key": APP_KEY, "scopes": ["inference"]},
            {
                "name": "flood",
                "key": FLOOD_KEY,
                "scopes": ["inference"],
                "max_concurrent_requests": 4,
                "requests_per_minute": 600,
            },
            {"name": "open", "key": OPEN_KEY, "scopes": ["inference"]},
        ],
        "llm": {"max_batch_size": FLOOD_STREAMS + 4, "max_waiting_requests": 4 * FLOOD_STREAMS},
    }


async def _ttft(stub, llm_pb2, key: str) -> float:
    request = llm_pb2.GenerateRequest(
        prompt="def probe(x):", sampling=llm_pb2.SamplingParams(max_new_tokens=PROBE_TOKENS, ignore_eos=True)
    )
    started = time.perf_counter()
    first = None
    async for _ in stub.GenerateStream(request, metadata=[("authorization", f"Bearer {key}")]):
        first = first or time.perf_counter()
    return first - started


async def _flood(stub, llm_pb2, key: str, stop: asyncio.Event) -> None:
    request = llm_pb2.GenerateRequest(
        prompt="def flood(x):", sampling=llm_pb2.SamplingParams(max_new_tokens=FLOOD_TOKENS, ignore_eos=True)
    )
    metadata = [("authorization", f"Bearer {key}")]
    while not stop.is_set():
        call = stub.GenerateStream(request, metadata=metadata)
        try:
            async for _ in call:
                if stop.is_set():
                    call.cancel()
                    break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)


def _phase(address: str, flood_key: str | None) -> float:
    """TTFT p50 of the `app` key over PROBES sequential streams, with `flood_key` flooding meanwhile."""
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    async def main() -> float:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            stop = asyncio.Event()
            flooders = []
            if flood_key:
                flooders = [asyncio.ensure_future(_flood(stub, llm_pb2, flood_key, stop)) for _ in range(FLOOD_STREAMS)]
                await asyncio.sleep(2.0)  # the flood reaches its steady state before the probes start
            samples = [await _ttft(stub, llm_pb2, APP_KEY) for _ in range(PROBES)]
            stop.set()
            await asyncio.gather(*flooders, return_exceptions=True)
            return statistics.median(samples)

    return asyncio.run(main())


def run(workdir: Path) -> list[Row]:
    server = spawn_service("llm", workdir / "key-limits-llm", _config(workdir))
    try:
        _phase(server.address, None)  # warm-up
        idle = _phase(server.address, None)
        limited = _phase(server.address, FLOOD_KEY)
        idle_again = _phase(server.address, None)
        unlimited = _phase(server.address, OPEN_KEY)
    finally:
        server.stop()
    baseline = (idle + idle_again) / 2
    return [
        Row(
            "tiny-llm",
            f"(s1) TTFT p50, a second key while a limited key floods ({FLOOD_STREAMS} streams), ms",
            f"{limited * 1000:.1f}",
            f"{baseline * 1000:.1f} (idle)",
            limited / baseline,
        ),
        Row(
            "tiny-llm",
            "(s1) the same flood from a key with no limits (reference), ms",
            f"{unlimited * 1000:.1f}",
            f"{baseline * 1000:.1f} (idle)",
            unlimited / baseline,
        ),
    ]


NOTE = (
    "(s1) goal: within 1.5x of idle with the flood key's limits; the idle figure is the mean of runs before and "
    "after the limited flood."
)
