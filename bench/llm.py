"""LLM serving benchmark: the gRPC service against plain in-process `model.generate`, side by side.

For each model (the built-in tiny-llm and a ~100M-parameter random Llama), in one run:
  (a) aggregate tokens/s of 16 requests through the service with 1, 4 and 16 concurrent streams,
      over the same 16 requests run one at a time through in-process `model.generate`;
  (b) end-to-end time of one request through gRPC over the same request in process (median);
  (c) time to first token p50/p95 with 16 concurrent streams;
  (d) 16 concurrent streams spread over 4 LoRA adapters vs 16 streams on the base model.
Every request generates exactly NEW_TOKENS tokens (ignore_eos / min_new_tokens), greedy.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from shared.adapters import AdapterInfo, AdapterStore
from shared.launch import spawn_service
from shared.loaders import load_causal_lm
from shared.settings import Settings

NEW_TOKENS = 64
REQUESTS = 16
ADAPTERS = 4
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


@dataclass
class Row:
    model: str
    measure: str
    service: str
    baseline: str
    ratio: float


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


def stream_all(stub, pb2, model: str, prompts: list[str], concurrency: int, adapters: list[str] | None = None):
    """Run every prompt as a stream with `concurrency` in flight; returns (tokens/s, first-token latencies)."""
    ttft: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal tokens
        adapter = adapters[i % len(adapters)] if adapters else ""
        request = pb2.GenerateRequest(model=model, prompt=prompts[i], adapter=adapter, sampling=_sampling(pb2))
        start = time.perf_counter()
        first = None
        for chunk in stub.GenerateStream(request):
            first = first or time.perf_counter() - start
            last = chunk
        with lock:
            ttft.append(first)
            tokens += last.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(prompts))))
    return tokens / (time.perf_counter() - start), ttft


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_model(entry, settings: Settings, stub, pb2) -> list[Row]:
    name = entry.name
    rows: list[Row] = []
    loaded = load_causal_lm(entry, settings)
    inprocess_one_at_a_time(loaded, PROMPTS[:2])  # warm-up
    base_tps, _ = inprocess_one_at_a_time(loaded, PROMPTS)
    stream_all(stub, pb2, name, PROMPTS[:4], 4)  # warm-up
    for concurrency in (1, 4, REQUESTS):
        tps, ttft = stream_all(stub, pb2, name, PROMPTS, concurrency)
        rows.append(
            Row(
                name,
                f"(a) tokens/s, {concurrency} concurrent streams",
                f"{tps:,.0f}",
                f"{base_tps:,.0f} (generate, 1 at a time)",
                tps / base_tps,
            )
        )
        if concurrency == REQUESTS:
            ttft_16 = ttft

    # (b) a single request, unary, interleaved with the in-process call so both see the same machine
    grpc_times, local_times = [], []
    request = pb2.GenerateRequest(model=name, prompt=PROMPTS[0], sampling=_sampling(pb2))
    for _ in range(5):
        start = time.perf_counter()
        stub.Generate(request)
        grpc_times.append(time.perf_counter() - start)
        local_times.extend(inprocess_one_at_a_time(loaded, PROMPTS[:1])[1])
    g, local = statistics.median(grpc_times), statistics.median(local_times)
    rows.append(
        Row(name, "(b) one request end to end, s (median of 5)", f"{g:.3f}", f"{local:.3f} (generate)", g / local)
    )

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

    adapter_names = [f"bench-{name}-{i}" for i in range(ADAPTERS)]
    make_adapters(settings, entry, adapter_names)
    stream_all(stub, pb2, name, PROMPTS[:ADAPTERS], ADAPTERS, adapter_names)  # load them
    base16, _ = stream_all(stub, pb2, name, PROMPTS, REQUESTS)
    mixed16, _ = stream_all(stub, pb2, name, PROMPTS, REQUESTS, adapter_names)
    rows.append(
        Row(
            name,
            f"(d) tokens/s, 16 streams over {ADAPTERS} adapters",
            f"{mixed16:,.0f}",
            f"{base16:,.0f} (16 streams, base)",
            base16 / mixed16,
        )
    )
    del loaded
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
        with grpc.insecure_channel(server.address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            rows = []
            for entry in settings.models:
                rows.extend(bench_model(entry, settings, stub, llm_pb2))
            return rows
    finally:
        server.stop()


def print_table(rows: list[Row]) -> None:
    headers = ("model", "measure", "service", "baseline", "ratio")
    table = [headers] + [(r.model, r.measure, r.service, r.baseline, f"{r.ratio:.2f}x") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for i, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(
        "\nratio: (a) service over baseline (higher is better); (b) service time over in-process time "
        "(1.00 = no overhead); (c) p95 over p50; (d) base throughput over mixed-adapter throughput "
        "(1.00 = adapters cost nothing)."
    )
