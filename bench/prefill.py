"""Prefill benchmark: chunked prefill against one-shot prefill, and prefix-cached prompts against uncached.

On llm-100m (a ~100M-parameter random Llama), through the gRPC service, in one run:
  (e) 4 streams decode; a ~900-token prompt arrives. The running streams' largest inter-token gap while it
      prefills, over their median gap: with chunked prefill (the default) next to a server that prefills
      a prompt in one piece (llm.max_prefill_tokens = the prompt limit).
  (g) time to first token of a chat-style request whose ~500-token system prompt is in the prefix cache,
      over the same request with a system prompt never seen before (same length), side by side.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from pathlib import Path

import grpc

from bench.report import Row
from shared.loaders import load_causal_lm
from shared.settings import Settings
from tests.harness import spawn_service

MODEL = {"name": "llm-100m", "kind": "llm", "source": "builtin:llm-100m"}
STREAMS = 4
ROUNDS = 3
LONG_PROMPT_TOKENS = 900
SYSTEM_TOKENS = 500
WORDS = ["harbour", "lamp", "keeper", "tide", "signal", "rock", "gull", "storm", "rope", "chart"]


def text_of(tokens: int, seed: int) -> str:
    """Text of about `tokens` tokens (each word and digit is ~3.2 of the built-in tokenizer's), one per seed."""
    count = tokens * 10 // 32
    return " ".join(WORDS[(i * 7 + seed * 13 + i // 10) % len(WORDS)] + str((i + seed) % 10) for i in range(count))


async def gaps_around_a_long_prompt(address: str, pb2, pb2_grpc, seed: int) -> tuple[float, float]:
    """(max gap while the long prompt prefills, median gap) of the running streams, in seconds."""
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    long_window: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb2_grpc.LLMServiceStub(channel)

        async def running(i: int) -> None:
            request = pb2.GenerateRequest(
                model=MODEL["name"],
                prompt=f"stream {i}:",
                sampling=pb2.SamplingParams(max_new_tokens=120, ignore_eos=True),
            )
            async for _ in stub.GenerateStream(request):
                arrivals[i].append(time.perf_counter())

        async def long_prompt() -> None:
            while min(len(a) for a in arrivals) < 20:  # the streams are in steady decoding
                await asyncio.sleep(0.01)
            request = pb2.GenerateRequest(
                model=MODEL["name"],
                prompt=text_of(LONG_PROMPT_TOKENS, seed),
                sampling=pb2.SamplingParams(max_new_tokens=1, ignore_eos=True),
            )
            long_window.append(time.perf_counter())
            await stub.Generate(request)
            long_window.append(time.perf_counter())

        await asyncio.gather(*(running(i) for i in range(STREAMS)), long_prompt())
    return gaps_while(arrivals, *long_window)


def gaps_while(arrivals: list[list[float]], start: float, end: float) -> tuple[float, float]:
    """(largest gap between a stream's tokens that overlaps start..end, median gap over all streams)."""
    gaps, during = [], []
    for times in arrivals:
        for before, after in itertools.pairwise(times):
            gaps.append(after - before)
            if after >= start and before <= end:
                during.append(after - before)
    return max(during), statistics.median(gaps)


async def ttft(address: str, pb2, pb2_grpc, system: str, question: str) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb2_grpc.LLMServiceStub(channel)
        request = pb2.GenerateRequest(
            model=MODEL["name"],
            prompt=f"{system}\nQuestion: {question}\nAnswer:",
            sampling=pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
        )
        start = time.perf_counter()
        async for _ in stub.GenerateStream(request):
            return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def run(workdir: Path) -> list[Row]:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    base = {"data_dir": str(workdir), "models": [MODEL], "log_level": "WARNING"}
    settings = Settings.model_validate(base)
    load_causal_lm(settings.models[0], settings)  # built before the servers start
    chunked = spawn_service("llm", workdir / "prefill-chunked", base)
    one_shot = spawn_service("llm", workdir / "prefill-one-shot", base | {"llm": {"max_prefill_tokens": 8192}})
    try:
        gap_pairs = []  # (chunked, one-shot) max/median gap ratios, one pair a round
        cached_pairs = []
        for round_ in range(ROUNDS):
            mine = asyncio.run(gaps_around_a_long_prompt(chunked.address, llm_pb2, llm_pb2_grpc, round_))
            theirs = asyncio.run(gaps_around_a_long_prompt(one_shot.address, llm_pb2, llm_pb2_grpc, round_))
            gap_pairs.append((mine[0] / mine[1], theirs[0] / theirs[1]))
            seen = text_of(SYSTEM_TOKENS, 100 + round_)
            asyncio.run(ttft(chunked.address, llm_pb2, llm_pb2_grpc, seen, "warm the cache"))
            for question in ("when does the harbour open?", "who keeps the lamp?"):
                fresh = text_of(SYSTEM_TOKENS, 1000 + len(cached_pairs))  # never seen: nothing cached
                uncached = asyncio.run(ttft(chunked.address, llm_pb2, llm_pb2_grpc, fresh, question))
                cached = asyncio.run(ttft(chunked.address, llm_pb2, llm_pb2_grpc, seen, question))
                cached_pairs.append((cached, uncached))
    finally:
        chunked.stop()
        one_shot.stop()
    mine = statistics.median(p[0] for p in gap_pairs)
    theirs = statistics.median(p[1] for p in gap_pairs)
    return [
        Row(
            MODEL["name"],
            f"(e) max / median token gap, {STREAMS} streams, a ~{LONG_PROMPT_TOKENS}-token prompt arriving",
            f"{mine:.2f}x (chunked)",
            f"{theirs:.2f}x (one-shot prefill)",
            mine,
        ),
        Row.of_pairs(
            MODEL["name"],
            f"(g) time to first token, ~{SYSTEM_TOKENS}-token system prompt cached, s",
            cached_pairs,
            ".3f",
            "not cached",
        ),
    ]


NOTE = (
    f"Medians of {ROUNDS} rounds. (e) the ratio is the chunked server's max gap over its median gap (target"
    " <= 2.00x); the baseline column is the same figure for a server that prefills the prompt in one piece."
    " (g) cached over uncached time to first token, lower is better (target <= 0.30x)."
)
