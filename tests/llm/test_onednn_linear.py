"""The CPU's oneDNN linears (`llm.onednn_linears`, on by default) compute what torch's default matmul does:
the same logits within float32 rounding, the same greedy text, with and without LoRA rows in the batch."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.batch import prefill_logits
from services.llm.onednn_linear import OneDnnLinear, onednn_usable, use_onednn_linears
from shared.loaders import load_causal_lm
from tests.llm.engine_helpers import PROMPTS, encode, make_engine, run


def test_onednn_takes_float32_and_a_dtype_it_cannot_run_stays_on_the_default_path():
    assert onednn_usable(torch.float32) and not onednn_usable(torch.float16)
    # bf16 runs through oneDNN only on CPUs with AVX-512 (its probe says which); elsewhere nothing is routed
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    routed = use_onednn_linears(model)
    assert routed == (1 if onednn_usable(torch.bfloat16) else 0)
    with torch.inference_mode():
        assert model(torch.ones(2, 8, dtype=torch.bfloat16)).shape == (2, 8)


def test_the_routed_model_gives_the_default_paths_logits_and_greedy_text(settings, adapters):
    default = load_causal_lm(settings.models[0], settings)
    routed = load_causal_lm(settings.models[0], settings)
    linears = sum(type(m) is nn.Linear for m in routed.model.modules())
    assert use_onednn_linears(routed.model) == linears > 0
    assert use_onednn_linears(routed.model) == linears, "idempotent"
    assert not any(type(m) is nn.Linear for m in routed.model.modules())
    assert routed.model.state_dict().keys() == default.model.state_dict().keys()

    prompts = [encode(default, p) for p in PROMPTS]
    expected, got = prefill_logits(default.model, prompts), prefill_logits(routed.model, prompts)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()

    texts = {}
    for name, loaded in (("default", default), ("routed", routed)):
        engine = make_engine(loaded, settings)
        engine.start()
        try:
            texts[name] = [run(engine, loaded, PROMPTS[0], adapter=a, max_new_tokens=12)[0] for a in [None, *adapters]]
        finally:
            engine.shutdown()
    assert texts["routed"] == texts["default"]
    wrapped = [m for m in routed.model.modules() if hasattr(m, "base") and isinstance(m.base, OneDnnLinear)]
    assert wrapped, "the LoRA layers wrap the oneDNN linears"
