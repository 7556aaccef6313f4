"""The CUDA-graph decode path, run on the CPU without capture: the same static plans a graph replays
(padded buckets, the spare row, full-row masks) give the eager engine's greedy texts, over a full-precision
base and over an NF4 one.

On a GPU, `make gpu-check` runs the captured graphs against the eager path (bench/gpu_check.py).
"""

from __future__ import annotations

import pytest

from services.llm.engine import Sequence
from services.llm.params import SamplingConfig
from shared.loaders import load_causal_lm
from tests.llm.engine_helpers import PROMPTS, Collector, encode, make_engine


def texts(engine, loaded, requests: list[tuple[str, int, str | None]]) -> list[str]:
    """Submit every (prompt, new tokens, adapter) at once; their texts in order."""
    collectors = []
    for prompt, new_tokens, adapter in requests:
        collector = Collector()
        config = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
        engine.submit(Sequence(encode(loaded, prompt), config, collector, adapter=adapter))
        collectors.append(collector)
    return [c.wait(120)[0] for c in collectors]


@pytest.mark.parametrize("quantization", ["none", "bnb-nf4"])
def test_static_decode_plans_give_the_eager_texts_as_sequences_join_and_leave(settings, adapters, quantization):
    # three then two then one decoding rows (buckets 4, 2, 1: padding rows write into the spare row), and
    # an adapter's row, which sends its steps down the eager path
    requests = [(PROMPTS[0], 30, None), (PROMPTS[1], 20, None), (PROMPTS[2], 10, None), (PROMPTS[3], 5, adapters[0])]
    results = []
    for graphs in (False, True):
        entry = settings.models[0].model_copy(update={"quantization": quantization})
        loaded = load_causal_lm(entry, settings)  # an engine's adapters wrap its model's layers
        engine = make_engine(loaded, settings, cuda_graphs=graphs)
        engine.start()
        try:
            results.append(texts(engine, loaded, requests))
            if graphs:
                buckets = {bucket for _, bucket, _ in engine._graphs._graphs}
                assert {1, 2, 4} <= buckets, f"the static path ran only for buckets {buckets}"
        finally:
            engine.shutdown()
    eager, static = results
    assert static == eager
