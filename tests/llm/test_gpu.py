"""Half precision for real: the loaded weights are bf16/fp16, and batching with mixed adapters agrees with
each request run alone on the same device.

On a GPU these run with the device's own half dtype (bf16, or fp16 without bf16 support); the same checks
run on the CPU in bf16 everywhere, so the checks themselves are exercised on every CI run.
"""

from __future__ import annotations

import pytest
import torch

from services.llm.adapters import LoraAdapterCache
from services.llm.batch import prefill_logits
from services.llm.engine import FinishReason, LLMEngine, Sequence, eos_token_ids
from services.llm.params import SamplingConfig
from shared.adapters import AdapterStore
from shared.loaders import load_causal_lm
from shared.settings import Settings
from tests.llm.engine_helpers import Collector

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [
    pytest.param("cuda", "auto", marks=[pytest.mark.gpu, cuda], id="cuda"),
    pytest.param("cpu", "bfloat16", id="cpu-bf16"),
]
PROMPTS = ["def parse(text):", "import os\nimport sys", "x = [", "# Copyright", "class A:", "for i in", "if x:", "y ="]


def half_precision_model(settings: Settings, device: str, dtype: str):
    entry = settings.models[0].model_copy(update={"device": device, "dtype": dtype})
    loaded = load_causal_lm(entry, settings)
    actual = next(loaded.model.parameters()).dtype  # what the weights are, not what was asked for
    assert actual in (torch.bfloat16, torch.float16), actual
    assert all(p.dtype == actual for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).device.type == device
    return loaded


def start_engine(loaded, settings) -> LLMEngine:
    cache = LoraAdapterCache(loaded.model, AdapterStore(settings.adapters_dir), 4, "tiny-llm", "builtin:tiny-llm")
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        model_name="tiny-llm",
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        max_batch_size=16,
        max_waiting=64,
        max_prompt_tokens=4096,
        adapters=cache,
    )
    engine.start()
    return engine


def submit(engine, loaded, prompt: str, adapter: str | None) -> tuple[Sequence, Collector]:
    collector = Collector()
    ids = loaded.tokenizer(prompt)["input_ids"]
    seq = Sequence(ids, SamplingConfig(max_new_tokens=24, ignore_eos=True), collector, adapter=adapter)
    engine.submit(seq)
    return seq, collector


def near_tie(loaded, engine, seq: Sequence, alone: list[int], together: list[int]) -> bool:
    """Where two greedy runs first part, were the two picks within half-precision rounding of each other?"""
    at = next(i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a != b)
    key = engine.adapters.acquire(seq.adapter) if seq.adapter else None
    engine.adapters.set_rows([key])
    ids = torch.tensor([seq.prompt_ids + alone[:at]], device=loaded.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0, -1].float()
    gap = (logits[alone[at]] - logits[together[at]]).abs().item()
    return gap <= 0.02 * logits.abs().max().item() + 0.05


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_half_precision_batch_with_mixed_adapters_agrees_with_each_request_alone(settings, adapters, device, dtype):
    """Greedy texts of a mixed-adapter batch equal each request's solo run, except where a near-tie flips a
    pick (a batch changes the order of half-precision sums): each such divergence must be a near-tie."""
    loaded = half_precision_model(settings, device, dtype)
    choices = [None, *adapters]
    rows = [choices[i % len(choices)] for i in range(len(PROMPTS))]
    engine = start_engine(loaded, settings)
    try:
        alone = []
        for prompt, adapter in zip(PROMPTS, rows, strict=True):
            seq, collector = submit(engine, loaded, prompt, adapter)
            collector.wait()
            alone.append(seq.output_ids)
        together = [submit(engine, loaded, prompt, adapter) for prompt, adapter in zip(PROMPTS, rows, strict=True)]
        finals = [collector.wait()[1] for _, collector in together]
    finally:
        engine.shutdown()
    assert all(f.error is None and f.finish_reason is FinishReason.LENGTH for f in finals)
    diverged = [i for i, (seq, _) in enumerate(together) if seq.output_ids != alone[i]]
    assert len(diverged) <= len(PROMPTS) // 2, f"{len(diverged)} of {len(PROMPTS)} requests diverged"
    for i in diverged:
        assert near_tie(loaded, engine, together[i][0], alone[i], together[i][0].output_ids), f"request {i}"


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_half_precision_first_step_logits_of_a_mixed_batch_match_each_row_alone(settings, adapters, device, dtype):
    loaded = half_precision_model(settings, device, dtype)
    cache = LoraAdapterCache(loaded.model, AdapterStore(settings.adapters_dir), 4, "tiny-llm", "builtin:tiny-llm")
    choices = [None, *adapters]
    rows = [choices[i % len(choices)] for i in range(len(PROMPTS))]
    keys = [cache.acquire(a) if a else None for a in rows]
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    cache.set_rows([key for key, prompt in zip(keys, prompts, strict=True) for _ in prompt], packed=True)
    batched = prefill_logits(loaded.model, prompts)  # one packed forward, as the engine runs it
    for i, (prompt, key) in enumerate(zip(prompts, keys, strict=True)):
        cache.set_rows([key])
        with torch.inference_mode():
            solo = loaded.model(input_ids=torch.tensor([prompt], device=loaded.device)).logits[:, -1]
        scale = solo.float().abs().max().item()
        difference = (batched[i].float() - solo[0].float()).abs().max().item()
        assert difference <= 0.05 * scale + 0.05, f"row {i}: logits differ by {difference:.4f} (scale {scale:.2f})"
