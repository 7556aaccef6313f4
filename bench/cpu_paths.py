"""The CPU's choices for the default chat model (SmolLM2-135M-Instruct), in process, side by side:

(l1) an engine decode step with the linear layers on oneDNN (`llm.onednn_linears`, the default) over the
     same step on torch's default matmul, at 1, 4 and 16 streams; the two alternate step by step in one
     engine, so a noisy moment on a shared machine hits both alike;
(l2) bf16 against float32 (dtype `auto`'s two answers on a CPU): the greedy replies to the same 16 chats,
     how many are identical and how many leading tokens agree, and bf16's decode step over float32's. On a
     CPU without native bf16 `auto` stays float32, and the step ratio shows why.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.realmodel import MODEL, QUESTIONS
from bench.report import Row
from services.llm.engine import LLMEngine, Sequence, eos_token_ids
from services.llm.onednn_linear import OneDnnLinear, use_onednn_linears
from services.llm.params import SamplingConfig
from shared.devices import native_bf16_cpu_feature
from shared.loaders import load_causal_lm, prepare
from shared.settings import Settings

STREAMS = (1, 4, 16)
STEPS = 40  # per side, alternating
REPLY_TOKENS = 48
NAME = MODEL["name"]


def _loaded(workdir: Path, dtype: str):
    settings = Settings.model_validate({"data_dir": str(workdir), "models": [{**MODEL, "dtype": dtype}]})
    prepare(settings.models[0], settings)
    return load_causal_lm(settings.models[0], settings)


def _engine(loaded) -> LLMEngine:
    return LLMEngine(
        loaded.model,
        loaded.tokenizer,
        model_name=NAME,
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        max_batch_size=max(STREAMS),
        max_waiting=len(QUESTIONS),
        max_prompt_tokens=4096,
    )


def _chat_ids(loaded, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def _decoding(engine: LLMEngine, loaded, streams: int, new_tokens: int) -> None:
    """`streams` sequences admitted, prefilled and decoding (the engine's steps run on this thread)."""
    config = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    for question in QUESTIONS[:streams]:
        engine.submit(Sequence(_chat_ids(loaded, question), config, lambda event: None))
    while engine.num_running < streams or engine._prefilling:
        engine._step()


def _linears_a_b(loaded) -> list[Row]:
    """Each linear switches between oneDNN and the default class per step: the same weights, alternating."""
    use_onednn_linears(loaded.model)
    linears = [m for m in loaded.model.modules() if type(m) is OneDnnLinear]
    engine = _engine(loaded)
    rows = []
    for streams in STREAMS:
        _decoding(engine, loaded, streams, 2 * STEPS + 8)
        pairs = []
        for _ in range(STEPS):
            times = {}
            for routed in (False, True):
                for module in linears:
                    module.__class__ = OneDnnLinear if routed else torch.nn.Linear
                started = time.perf_counter()
                engine._step()
                times[routed] = time.perf_counter() - started
            pairs.append((streams / times[True], streams / times[False]))
        while engine.num_running:
            engine._step()
        rows.append(Row.of_pairs(NAME, f"(l1) decode tokens/s, {streams} streams", pairs, ",.1f", "default matmul"))
    for module in linears:
        module.__class__ = OneDnnLinear
    return rows


def _greedy_replies(loaded) -> tuple[list[list[int]], float]:
    """The 16 chats' greedy replies in one batch, and the median decode step once all decode (s), with the
    linears as the service runs them (oneDNN where it takes the dtype)."""
    use_onednn_linears(loaded.model)
    engine = _engine(loaded)
    config = SamplingConfig(max_new_tokens=REPLY_TOKENS, ignore_eos=True)
    sequences = [Sequence(_chat_ids(loaded, q), config, lambda event: None) for q in QUESTIONS]
    for seq in sequences:
        engine.submit(seq)
    steps = []
    while engine.num_running or engine.num_waiting:
        started = time.perf_counter()
        engine._step()
        if not engine._prefilling and engine.num_running == len(QUESTIONS):
            steps.append(time.perf_counter() - started)
    return [list(seq.output_ids) for seq in sequences], statistics.median(steps)


def _bf16_against_fp32(workdir: Path) -> list[Row]:
    fp32_replies, fp32_step = _greedy_replies(_loaded(workdir, "float32"))
    bf16_replies, bf16_step = _greedy_replies(_loaded(workdir, "bfloat16"))
    same = sum(a == b for a, b in zip(bf16_replies, fp32_replies, strict=True))
    agreeing = []
    for a, b in zip(bf16_replies, fp32_replies, strict=True):
        agreeing.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
    native = native_bf16_cpu_feature()
    where = f"native ({native})" if native else "emulated: no AMX or AVX-512 BF16"
    return [
        Row(
            NAME,
            f"(l2) greedy replies identical in bf16 and float32, of {len(QUESTIONS)} x {REPLY_TOKENS} tokens",
            f"{same} of {len(QUESTIONS)}",
            f"leading tokens agreeing: median {statistics.median(agreeing):.0f}, min {min(agreeing)}",
            None,
        ),
        Row(
            NAME,
            f"(l2) decode step at {len(QUESTIONS)} streams, bf16 over float32 ({where})",
            f"{bf16_step * 1000:.0f} ms",
            f"{fp32_step * 1000:.0f} ms (float32)",
            bf16_step / fp32_step,
        ),
    ]


def run(workdir: Path) -> list[Row]:
    with torch.inference_mode():
        return [*_linears_a_b(_loaded(workdir, "float32")), *_bf16_against_fp32(workdir)]


NOTE = (
    f"In process, engine steps on the bench's thread. (l1) {STEPS} alternating pairs of decode steps per stream "
    "count; ratio: oneDNN's tokens/s over the default matmul's (higher is better). (l2) chat-templated questions, "
    f"greedy, {REPLY_TOKENS} new tokens, EOS ignored; ratio: bf16's step time over float32's (lower is better)."
)
