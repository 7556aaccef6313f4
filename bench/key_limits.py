"""Per-key limits under a flood: one API key floods the LLM service, another measures its time to first token.

(s1) TTFT p50 of a second client (key `app`, one short stream at a time) while key `flood` keeps 64
     streams asking, with the flood key's limits (`max_concurrent_requests` 4, `requests_per_minute`
     6,000), over the same client's TTFT on the idle server; and the same flood from a key with no limits,
     for reference (the batch fills with the flood's rows and every step gets slower).
The flood runs in a process of its own and retries a refused call after 100 ms, as an impatient client would.
"""

from __future__ import annotations

import asyncio
import multiprocessing
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


async def _flood(address: str, key: str, stop) -> None:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    request = llm_pb2.GenerateRequest(
        prompt="def flood(x):", sampling=llm_pb2.SamplingParams(max_new_tokens=FLOOD_TOKENS, ignore_eos=True)
    )
    metadata = [("authorization", f"Bearer {key}")]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)

        async def one_stream() -> None:
            while not stop.is_set():
                call = stub.GenerateStream(request, metadata=metadata)
                try:
                    async for _ in call:
                        if stop.is_set():
                            call.cancel()
                            break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(one_stream() for _ in range(FLOOD_STREAMS)))


def _flood_process(address: str, key: str, stop) -> None:
    """The flooding client, in a process of its own: the measuring client's event loop stays its own."""
    asyncio.run(_flood(address, key, stop))


def _phase(address: str, flood_key: str | None) -> float:
    """TTFT p50 of the `app` key over PROBES sequential streams, with `flood_key` flooding meanwhile."""
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    flooder = None
    if flood_key:
        flooder = context.Process(target=_flood_process, args=(address, flood_key, stop), daemon=True)
        flooder.start()
        time.sleep(5.0)  # the flooder starts and reaches its steady state before the probes

    async def probes() -> list[float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            return [await _ttft(stub, llm_pb2, APP_KEY) for _ in range(PROBES)]

    try:
        samples = asyncio.run(probes())
    finally:
        stop.set()
        if flooder is not None:
            flooder.join(60)
            if flooder.is_alive():
                flooder.kill()
    return statistics.median(samples)


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
