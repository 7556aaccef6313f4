"""Chunked prefill and the prefix cache, on the tiny model: same text as one-shot, no stall for the running."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from services.llm.engine import Sequence
from services.llm.params import SamplingConfig
from services.llm.prefix_cache import PrefixCache
from shared.errors import Cancelled
from shared.loaders import load_causal_lm
from tests.llm.engine_helpers import HELD, Collector, GatedCollector, encode, make_engine, run

LONG_PROMPT = "The lighthouse keeper wrote in the log: " + "wind from the west, sea calm, lamp lit. " * 6
SYSTEM = "You are a careful assistant who answers in one short sentence. Context: the harbour opens at six. "


@pytest.fixture(scope="module")
def loaded(settings):
    return load_causal_lm(settings.models[0], settings)


@pytest.fixture
def engine_factory(loaded, settings):
    engines = []

    def make(**options):
        engine = make_engine(loaded, settings, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": "tiny-llm"}) or 0.0


def hold_a_stream(engine, loaded, prompt: str = "x = [") -> tuple[Sequence, GatedCollector]:
    """A sequence that decodes until cancelled, with the engine held at its first text until `release()`."""
    gate = GatedCollector()
    seq = Sequence(encode(loaded, prompt), SamplingConfig(max_new_tokens=HELD, ignore_eos=True), gate)
    engine.submit(seq)
    assert gate.holding.wait(60), "the held stream never produced text"
    return seq, gate


def test_a_long_prompt_prefilled_in_chunks_gives_the_one_shot_text_and_never_stalls_the_running(engine_factory, loaded):
    alone_engine = engine_factory()
    long_ids = encode(loaded, LONG_PROMPT)
    assert len(long_ids) > 40
    alone, _ = run(alone_engine, loaded, LONG_PROMPT, max_new_tokens=12)
    alone_engine.shutdown()

    engine = engine_factory(max_prefill_tokens=8)
    running, gate = hold_a_stream(engine, loaded)
    seen_at_first_token: list[int] = []
    collector = Collector()

    def on_event(event):
        if not collector.events:
            seen_at_first_token.append(len(running.output_ids))
        collector(event)

    engine.submit(Sequence(long_ids, SamplingConfig(max_new_tokens=12, ignore_eos=True), on_event))
    gate.release()  # the long prompt is admitted at the next step, next to the running stream
    text, final = collector.wait()
    assert final.error is None and text == alone, "chunked prefill gives the one-shot text"
    chunks = -(-len(long_ids) // 8)
    # the running stream decoded a token in (nearly) every step the long prompt was being prefilled
    assert seen_at_first_token[0] >= chunks - 1, (seen_at_first_token, chunks)
    running.cancel()


def test_the_running_streams_text_is_unchanged_by_a_long_prompt_arriving(engine_factory, loaded):
    engine = engine_factory(max_prefill_tokens=8)
    running, gate = hold_a_stream(engine, loaded)
    joined = Collector()
    engine.submit(Sequence(encode(loaded, LONG_PROMPT), SamplingConfig(max_new_tokens=4, ignore_eos=True), joined))
    gate.release()
    joined.wait()
    running.cancel()
    held_text, final = gate.wait()
    assert isinstance(final.error, Cancelled)
    solo, _ = run(engine, loaded, "x = [", max_new_tokens=final.completion_tokens)
    assert solo.startswith(held_text) and len(held_text) > 0


def test_a_cached_prefix_gives_the_uncached_text_and_is_counted(engine_factory, loaded):
    uncached = engine_factory()
    cached = engine_factory(prefix_cache=PrefixCache(block_tokens=4, capacity_bytes=64 << 20))
    questions = ["Q: when does the harbour open? A:", "Q: who keeps the light? A:", "Q: is the sea calm? A:"]
    hits = sample("modelworks_llm_prefix_cache_hits_total")
    for question in questions:
        expected, _ = run(uncached, loaded, SYSTEM + question, max_new_tokens=10)
        got, _ = run(cached, loaded, SYSTEM + question, max_new_tokens=10)
        assert got == expected, question
    reused = sample("modelworks_llm_prefix_cache_hits_total") - hits
    system_blocks = len(encode(loaded, SYSTEM)) // 4
    assert reused >= 2 * (system_blocks - 1) * 4, "the 2nd and 3rd requests reuse the system prompt's blocks"
    repeat, _ = run(cached, loaded, SYSTEM + questions[0], max_new_tokens=10)
    assert repeat == run(uncached, loaded, SYSTEM + questions[0], max_new_tokens=10)[0]


def test_concurrent_requests_sharing_a_prefix_match_their_solo_runs(engine_factory, loaded):
    engine = engine_factory(prefix_cache=PrefixCache(block_tokens=4, capacity_bytes=64 << 20), max_prefill_tokens=8)
    prompts = [SYSTEM + f"Q: what is {i} plus {i}? A:" for i in range(5)]
    alone = [run(engine, loaded, p, max_new_tokens=8)[0] for p in prompts]  # later ones hit the cache
    collectors = [Collector() for _ in prompts]
    for prompt, collector in zip(prompts, collectors, strict=True):
        engine.submit(Sequence(encode(loaded, prompt), SamplingConfig(max_new_tokens=8, ignore_eos=True), collector))
    assert [c.wait()[0] for c in collectors] == alone


def test_an_adapter_never_reuses_the_base_models_prefix_kv(settings, adapters):
    fresh = load_causal_lm(settings.models[0], settings)  # adapters wrap the model: keep `loaded` clean
    engine = make_engine(fresh, settings, prefix_cache=PrefixCache(block_tokens=4, capacity_bytes=64 << 20))
    engine.start()
    try:
        prompt = SYSTEM + "Q: who keeps the light? A:"
        base, _ = run(engine, fresh, prompt, max_new_tokens=6)  # the base model's blocks are cached
        hits = sample("modelworks_llm_prefix_cache_hits_total")
        with_adapter, _ = run(engine, fresh, prompt, adapter=adapters[0], max_new_tokens=6)
        assert sample("modelworks_llm_prefix_cache_hits_total") == hits, "a LoRA on k/v changes the KV"
        assert with_adapter != base
        again, _ = run(engine, fresh, prompt, adapter=adapters[0], max_new_tokens=6)
        assert sample("modelworks_llm_prefix_cache_hits_total") > hits, "the adapter's own blocks are reused"
        assert again == with_adapter
    finally:
        engine.shutdown()


def test_the_prefix_cache_evicts_least_recently_used_blocks_children_first():
    layer = (torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))  # 8 tokens of KV, 2 blocks of 4
    block_bytes = 2 * 2 * 4 * 4 * 4  # keys and values of one block, float32
    cache = PrefixCache(block_tokens=4, capacity_bytes=3 * block_bytes)
    cache.insert(None, list(range(8)), [layer])
    assert len(cache) == 2 and cache.lookup(None, list(range(9)))[0] == 8
    cache.insert(None, [100, 101, 102, 103, 104, 105, 106, 107], [layer])  # 2 more blocks: one must go
    assert len(cache) == 3 and cache.nbytes <= 3 * block_bytes
    assert cache.lookup(None, list(range(9)))[0] == 4, "the older prompt's child block went first"
    assert cache.lookup(None, [100, 101, 102, 103, 104, 105, 106, 107, 0])[0] == 8
    assert cache.lookup("adapter-a", list(range(9)))[0] == 0, "another namespace sees nothing"
    assert cache.lookup(None, list(range(4)))[0] == 0, "one token is always left to compute"


def test_a_prompt_that_ends_on_a_block_boundary_still_computes_its_last_token(engine_factory, loaded):
    ids = encode(loaded, SYSTEM)[:16]
    engine = engine_factory(prefix_cache=PrefixCache(block_tokens=4, capacity_bytes=64 << 20))
    first, second = Collector(), Collector()
    for collector in (first, second):
        engine.submit(Sequence(ids, SamplingConfig(max_new_tokens=6, ignore_eos=True), collector))
        collector.wait()
    assert first.wait()[0] == second.wait()[0]


class CancelledMidPrefill(Sequence):
    """Cancels itself once part of its prompt is prefilled: on the engine thread, so mid-prefill for sure."""

    @property
    def prefilled(self) -> int:
        return self._prefilled

    @prefilled.setter
    def prefilled(self, value: int) -> None:
        self._prefilled = value
        if 0 < value < self.prompt_cost:
            self.cancel()


def test_cancelling_a_sequence_mid_prefill_frees_its_slot(engine_factory, loaded):
    engine = engine_factory(max_prefill_tokens=8, max_batch_size=2)
    running, gate = hold_a_stream(engine, loaded)
    cancelled = Collector()
    engine.submit(CancelledMidPrefill(encode(loaded, LONG_PROMPT), SamplingConfig(max_new_tokens=4), cancelled))
    gate.release()
    _, final = cancelled.wait()
    assert isinstance(final.error, Cancelled)
    _, done = run(engine, loaded, "y", max_new_tokens=3)  # the batch holds 2: the slot was freed
    assert done.error is None and done.completion_tokens == 3
    running.cancel()


def test_a_burst_of_short_prompts_joins_the_running_batch_in_one_step(engine_factory, loaded):
    """Chunking is for long prompts: short ones arriving together are prefilled together, whatever the budget."""
    engine = engine_factory(max_prefill_tokens=8)
    running, gate = hold_a_stream(engine, loaded)
    joined_at: list[int] = []
    collectors = []
    for i in range(6):
        collector = Collector()

        def on_event(event, collector=collector):
            if not collector.events:
                joined_at.append(len(running.output_ids))
            collector(event)

        collectors.append(collector)
        prompt = encode(loaded, f"def handler_{i}(request):")
        engine.submit(Sequence(prompt, SamplingConfig(max_new_tokens=3, ignore_eos=True), on_event))
    gate.release()
    for collector in collectors:
        assert collector.wait()[1].error is None
    assert len(set(joined_at)) == 1, f"all six joined at the same step, not at {joined_at}"
    running.cancel()
