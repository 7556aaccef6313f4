"""CUDA paths of the LLM engine: bf16/fp16 weights, a batched generate, multi-LoRA. Run where a GPU is."""

from __future__ import annotations

import threading

import pytest
import torch

from services.llm.adapters import LoraAdapterCache
from services.llm.engine import FinishReason, LLMEngine, Sequence, eos_token_ids
from services.llm.params import SamplingConfig
from shared.adapters import AdapterStore
from shared.loaders import load_causal_lm
from shared.settings import Settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_batched_generation_with_mixed_adapters_on_cuda(settings, adapters):
    cuda = Settings.model_validate(
        settings.model_dump() | {"models": [settings.models[0].model_dump() | {"device": "cuda"}]}
    )
    loaded = load_causal_lm(cuda.models[0], cuda)
    assert loaded.dtype in (torch.bfloat16, torch.float16)
    cache = LoraAdapterCache(loaded.model, AdapterStore(cuda.adapters_dir), 4, "tiny-llm", "builtin:tiny-llm")
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        model_name="tiny-llm",
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        max_batch_size=16,
        max_waiting=64,
        max_prefill_tokens=4096,
        adapters=cache,
    )
    engine.start()
    finals, done = [], threading.Semaphore(0)

    def collect(event):
        if event.final:
            finals.append(event)
            done.release()

    try:
        for i in range(8):
            config = SamplingConfig(max_new_tokens=32, temperature=0.8 if i % 2 else 0.0, ignore_eos=True)
            engine.submit(Sequence([1, 286, 80 + i], config, collect, adapter=[None, *adapters][i % 4]))
        for _ in range(8):
            assert done.acquire(timeout=120)
    finally:
        engine.shutdown()
    assert all(e.error is None and e.finish_reason is FinishReason.LENGTH for e in finals)
    assert all(e.completion_tokens == 32 for e in finals)
