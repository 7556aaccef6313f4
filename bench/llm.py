"""LLM serving benchmark: the gRPC service against plain in-process `model.generate`, side by side.

For each model (the built-in tiny-llm and a ~100M-parameter random Llama), in one run:
  (a) aggregate tokens/s of 16 requests through the service with 1, 4 and 16 concurrent streams,
      over the same 16 requests run one at a time through in-process `model.generate`;
  (b) end-to-end time of one request through gRPC over the same request in process (median);
  (c) time to first token p50/p95 with 16 concurrent streams;
  (d) 16 concurrent streams spread over 4 LoRA adapters vs 16 streams on the base model, in two sets a
      round of runs in the order base, mixed, mixed, base, each run lasting a few seconds at least.
Every request generates exactly NEW_TOKENS tokens (ignore_eos / min_new_tokens), greedy.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from pathlib import Path

import grpc
import torch

from bench.report import Row, percentile
from shared.adapters import AdapterInfo, AdapterStore
from shared.loaders import load_causal_lm
from shared.settings import Settings
from tests.harness import spawn_service

NEW_TOKENS = 64
REQUESTS = 16
ADAPTERS = 4
ROUNDS = 3
MIN_RUN_S = 3.0  # (d): each of its runs streams for about this long at least
ADAPTER_SETS = 2  # (d): sets of base, mixed, mixed, base runs in each round
MODELS = [
    {"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm"},
    {"name": "llm-100m", "kind": "llm", "source": "builtin:llm-100m"},
]
PROMPTS = [
    f"{subject} {i}:"
    for i, subject in enumerate(
        ["def parse_config(path)", "class HTTPServer", "import json\n\ndef load", "# utilities"] * 4
    )
]


def _sampling(pb2):
    return pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


def inprocess_one_at_a_time(loaded, prompts: list[str]) -> tuple[float, list[float]]:
    """Tokens/s and per-request seconds of plain `model.generate`, batch 1, one after another."""
    model, tokenizer = loaded.model, loaded.tokenizer
    times = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(loaded.device)
            start = time.perf_counter()
            model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            times.append(time.perf_counter() - start)
    return len(prompts) * NEW_TOKENS / sum(times), times


def stream_all(
    address: str, pb2, pb2_grpc, model: str, prompts: list[str], concurrency: int, adapters: list[str] | None = None
) -> tuple[float, list[float]]:
    """Run every prompt as a stream, `concurrency` in flight; returns (tokens/s, first-message latencies)."""
    requests = [
        pb2.GenerateRequest(
            model=model, prompt=prompt, adapter=adapters[i % len(adapters)] if adapters else "", sampling=_sampling(pb2)
        )
        for i, prompt in enumerate(prompts)
    ]
    return stream_requests(address, pb2_grpc, requests, concurrency)


def stream_requests(address: str, pb2_grpc, requests: list, concurrency: int) -> tuple[float, list[float]]:
    """Run every request as a stream, `concurrency` in flight; returns (tokens/s, first-message latencies).

    One asyncio client thread drives all streams, so the client takes as little of the machine's CPU as
    it can: the server shares this machine with it.
    """

    async def main() -> tuple[float, list[float]]:
        ttft: list[float] = []
        tokens = 0
        gate = asyncio.Semaphore(concurrency)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb2_grpc.LLMServiceStub(channel)

            async def one(request) -> None:
                nonlocal tokens
                async with gate:
                    start = time.perf_counter()
                    first = None
                    async for chunk in stub.GenerateStream(request):
                        first = first or time.perf_counter() - start
                        last = chunk
                ttft.append(first)
                tokens += last.usage.completion_tokens

            start = time.perf_counter()
            await asyncio.gather(*(one(r) for r in requests))
            return tokens / (time.perf_counter() - start), ttft

    return asyncio.run(main())


def adapters_over_base(
    address: str, pb2, pb2_grpc, model: str, adapters: list[str], base_tps: float
) -> list[tuple[float, float]]:
    """(d): (mixed, base) tokens/s of 16 streams spread over `adapters` and of 16 base-model streams, for
    each of ADAPTER_SETS sets run in the order base, mixed, mixed, base, so a drift of the shared machine's
    speed weighs on both sides alike. Each run streams the prompts as many times as it takes to last about
    MIN_RUN_S at `base_tps` (the round's 16-stream figure): a small model's 16 requests end in a quarter of
    a second, too short to time."""
    passes = max(1, math.ceil(MIN_RUN_S * base_tps / (len(PROMPTS) * NEW_TOKENS)))
    prompts = PROMPTS * passes

    def run(names: list[str] | None) -> float:
        return stream_all(address, pb2, pb2_grpc, model, prompts, REQUESTS, names)[0]

    pairs = []
    for _ in range(ADAPTER_SETS):
        base = [run(None)]
        mixed = [run(adapters), run(adapters)]
        base.append(run(None))
        pairs.append((statistics.fmean(mixed), statistics.fmean(base)))
    return pairs


def make_adapters(settings: Settings, entry, names: list[str]) -> None:
    from peft import LoraConfig, get_peft_model

    store = AdapterStore(settings.adapters_dir)
    for seed, name in enumerate(names):
        if (store.root / name).exists():
            continue
        model = load_causal_lm(entry, settings).model
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        peft_model = get_peft_model(model, lora)
        store.save(AdapterInfo(name=name, kind="llm", base_model=entry.name), peft_model.save_pretrained)


def bench_model(entry, settings: Settings, address: str, pb2, pb2_grpc) -> list[Row]:
    """ROUNDS rounds; in each, every measurement runs right next to the baseline it is compared with."""
    name = entry.name
    loaded = load_causal_lm(entry, settings)
    adapter_names = [f"bench-{name}-{i}" for i in range(ADAPTERS)]
    make_adapters(settings, entry, adapter_names)
    inprocess_one_at_a_time(loaded, PROMPTS[:2])  # warm-ups
    stream_all(address, pb2, pb2_grpc, name, PROMPTS[:ADAPTERS], ADAPTERS, adapter_names)  # loads the adapters

    streams: dict[int, list[tuple[float, float]]] = {c: [] for c in (1, 4, REQUESTS)}
    single: list[tuple[float, float]] = []
    mixed: list[tuple[float, float]] = []
    ttft_16: list[float] = []
    request = pb2.GenerateRequest(model=name, prompt=PROMPTS[0], sampling=_sampling(pb2))
    with grpc.insecure_channel(address) as channel:
        stub = pb2_grpc.LLMServiceStub(channel)
        for _ in range(ROUNDS):
            base_tps, _ = inprocess_one_at_a_time(loaded, PROMPTS)
            for concurrency in streams:
                tps, ttft = stream_all(address, pb2, pb2_grpc, name, PROMPTS, concurrency)
                streams[concurrency].append((tps, base_tps))
            ttft_16.extend(ttft)
            mixed.extend(adapters_over_base(address, pb2, pb2_grpc, name, adapter_names, tps))
            for _ in range(2):  # (b) unary through gRPC next to the same call in process
                start = time.perf_counter()
                stub.Generate(request)
                elapsed = time.perf_counter() - start
                single.append((elapsed, inprocess_one_at_a_time(loaded, PROMPTS[:1])[1][0]))

    rows = [
        Row.of_pairs(name, f"(a) tokens/s, {c} concurrent streams", pairs, ",.0f", "generate, 1 at a time")
        for c, pairs in streams.items()
    ]
    rows.append(Row.of_pairs(name, "(b) one request end to end, s", single, ".3f", "generate"))
    p50, p95 = percentile(ttft_16, 0.5), percentile(ttft_16, 0.95)
    rows.append(
        Row(
            name,
            "(c) time to first token p50 / p95, 16 streams",
            f"{p50 * 1000:.0f} / {p95 * 1000:.0f} ms",
            "-",
            p95 / p50,
        )
    )
    rows.append(
        Row.of_pairs(
            name, f"(d) tokens/s, 16 streams over {ADAPTERS} adapters", mixed, ",.0f", "16 streams, base", invert=True
        )
    )
    return rows


def run(workdir: Path) -> list[Row]:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    config = {
        "data_dir": str(workdir),
        "models": MODELS,
        "log_level": "WARNING",
        "llm": {"max_batch_size": 32, "adapter_cache_size": 8},
    }
    settings = Settings.model_validate(config)
    for entry in settings.models:  # build before the server starts, so start-up is not timed out
        load_causal_lm(entry, settings)
    server = spawn_service("llm", workdir / "llm-server", config)
    try:
        rows = []
        for entry in settings.models:
            rows.extend(bench_model(entry, settings, server.address, llm_pb2, llm_pb2_grpc))
        return rows
    finally:
        server.stop()


NOTE = (
    f"Medians of {ROUNDS} rounds; each ratio is the median of the per-round ratios. (a) service over"
    " baseline, higher is better; (b) service time over in-process time, 1.00 = no overhead; (c) p95 over"
    f" p50; (d) base-model over mixed-adapter throughput, the median over {ADAPTER_SETS} sets a round of two"
    f" runs of each, in the order base, mixed, mixed, base, each streaming for {MIN_RUN_S:.0f} s or more;"
    " 1.00 = adapters cost nothing."
)
