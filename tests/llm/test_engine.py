"""The continuous-batching engine driven directly, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from services.llm import metrics
from services.llm.engine import FinishReason, Sequence
from services.llm.params import SamplingConfig
from shared.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from shared.loaders import load_causal_lm
from tests.harness import wait_for
from tests.llm.engine_helpers import HELD, PROMPTS, Collector, encode, hf_greedy, make_engine, run


@pytest.fixture(scope="module")
def loaded(settings):
    return load_causal_lm(settings.models[0], settings)


@pytest.fixture
def engine(loaded, settings):
    engine = make_engine(loaded, settings)
    engine.start()
    yield engine
    engine.shutdown()


def test_greedy_matches_transformers_generate(engine, loaded):
    for prompt in PROMPTS:
        text, final = run(engine, loaded, prompt, max_new_tokens=12)
        assert text == hf_greedy(loaded, prompt, 12)
        assert final.finish_reason is FinishReason.LENGTH
        assert final.completion_tokens == 12 and final.prompt_tokens == len(encode(loaded, prompt))


def test_sequences_joining_and_leaving_a_running_batch_match_running_alone(engine, loaded):
    alone = [run(engine, loaded, p, max_new_tokens=8 + 6 * i)[0] for i, p in enumerate(PROMPTS)]
    collectors = []
    for i, prompt in enumerate(PROMPTS):  # staggered: each joins while the others decode
        c = Collector()
        config = SamplingConfig(max_new_tokens=8 + 6 * i, ignore_eos=True)
        engine.submit(Sequence(encode(loaded, prompt), config, c))
        collectors.append(c)
        if i == 1:
            collectors[0].wait()  # the first leaves before the last two join
    assert [c.wait()[0] for c in collectors] == alone


def test_same_seed_same_text_and_different_seeds_differ(engine, loaded):
    sampled = dict(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=24)
    a = run(engine, loaded, PROMPTS[0], seed=7, **sampled)[0]
    b = run(engine, loaded, PROMPTS[0], seed=7, **sampled)[0]
    c = run(engine, loaded, PROMPTS[0], seed=8, **sampled)[0]
    assert a == b
    assert a != c


def test_seeded_output_does_not_depend_on_batch_neighbours(engine, loaded):
    sampled = dict(temperature=0.9, seed=42, max_new_tokens=16)
    alone = run(engine, loaded, PROMPTS[1], **sampled)[0]
    others = [Collector() for _ in range(3)]
    for i, c in enumerate(others):
        engine.submit(Sequence(encode(loaded, PROMPTS[i % 2]), SamplingConfig(max_new_tokens=30, temperature=1.0), c))
    together = run(engine, loaded, PROMPTS[1], **sampled)[0]
    for c in others:
        c.wait()
    assert together == alone


def test_stop_string_truncates_and_reports_stop(engine, loaded):
    full, _ = run(engine, loaded, PROMPTS[1], max_new_tokens=30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    text, final = run(engine, loaded, PROMPTS[1], max_new_tokens=30, stop=(stop,))
    assert text == expected
    assert final.finish_reason is FinishReason.STOP


def test_eos_ends_generation_unless_ignored(loaded, settings):
    greedy = loaded.model.generate(torch.tensor([encode(loaded, PROMPTS[3])]), max_new_tokens=6, do_sample=False)
    eos = int(greedy[0, -3])  # pretend the model's third new token ends sequences
    engine = make_engine(loaded, settings)
    engine._eos = {eos}
    engine.start()
    try:
        text, final = run(engine, loaded, PROMPTS[3], max_new_tokens=20, ignore_eos=False)
        assert final.finish_reason is FinishReason.EOS
        assert final.completion_tokens == 4  # EOS counts as generated, its text is not emitted
        assert text == hf_greedy(loaded, PROMPTS[3], 3)
        _, final = run(engine, loaded, PROMPTS[3], max_new_tokens=20, ignore_eos=True)
        assert final.finish_reason is FinishReason.LENGTH
    finally:
        engine.shutdown()


def test_queue_bound_gives_resource_exhausted(loaded, settings):
    engine = make_engine(loaded, settings, max_waiting=2)  # not started: nothing leaves the queue
    config = SamplingConfig(max_new_tokens=4)
    engine.submit(Sequence([1, 2], config, Collector()))
    engine.submit(Sequence([1, 2], config, Collector()))
    with pytest.raises(ResourceExhausted, match=r"queue .* is full"):
        engine.submit(Sequence([1, 2], config, Collector()))


def test_cancelled_sequences_free_their_slot_at_the_next_step(engine, loaded):
    collector = Collector()
    seq = Sequence(encode(loaded, "x"), SamplingConfig(max_new_tokens=HELD, ignore_eos=True), collector)
    engine.submit(seq)
    wait_for(lambda: collector.events, 60, "the first token")
    seq.cancel()
    _, final = collector.wait()
    assert isinstance(final.error, Cancelled)
    assert final.completion_tokens < HELD
    wait_for(lambda: engine.num_running == 0, 60, "the slot to be freed")  # the final event comes first


def test_a_passed_deadline_ends_the_sequence(engine, loaded):
    import time

    collector = Collector()
    config = SamplingConfig(max_new_tokens=HELD, ignore_eos=True)
    engine.submit(Sequence(encode(loaded, "x"), config, collector, deadline=time.monotonic() + 0.2))
    _, final = collector.wait()
    assert isinstance(final.error, DeadlineExceeded)


def test_mixed_adapter_batch_matches_each_adapter_alone(loaded, settings, adapters):
    fresh = load_causal_lm(settings.models[0], settings)  # adapters wrap the model: keep `loaded` clean
    engine = make_engine(fresh, settings)
    engine.start()
    try:
        choices = [None, *adapters]
        alone = {a: run(engine, fresh, PROMPTS[0], adapter=a)[0] for a in choices}
        assert len(set(alone.values())) == len(choices), "each adapter must change the output"
        collectors = {a: Collector() for a in choices}
        for adapter, c in collectors.items():
            engine.submit(
                Sequence(
                    encode(fresh, PROMPTS[0]), SamplingConfig(max_new_tokens=16, ignore_eos=True), c, adapter=adapter
                )
            )
        assert {a: c.wait()[0] for a, c in collectors.items()} == alone
    finally:
        engine.shutdown()


def test_adapter_lru_evicts_the_least_recently_used(settings, adapters):
    fresh = load_causal_lm(settings.models[0], settings)
    engine = make_engine(fresh, settings, capacity=2)
    engine.start()
    evictions = metrics.ADAPTER_EVICTIONS.labels("tiny-llm")
    try:
        before = evictions._value.get()
        first = run(engine, fresh, PROMPTS[2], adapter=adapters[0])[0]
        run(engine, fresh, PROMPTS[2], adapter=adapters[1])
        run(engine, fresh, PROMPTS[2], adapter=adapters[2])
        assert engine.adapters.loaded == adapters[1:]
        assert evictions._value.get() - before == 1
        assert run(engine, fresh, PROMPTS[2], adapter=adapters[0])[0] == first  # reloads the same weights
    finally:
        engine.shutdown()


def test_shutdown_fails_waiting_sequences_with_unavailable(loaded, settings):
    engine = make_engine(loaded, settings)  # never started: the sequence stays queued
    collector = Collector()
    engine.submit(Sequence([1, 2, 3], SamplingConfig(max_new_tokens=4), collector))
    engine.shutdown()
    _, final = collector.wait(5)
    assert isinstance(final.error, Unavailable)
    with pytest.raises(Unavailable):
        engine.submit(Sequence([1, 2, 3], SamplingConfig(max_new_tokens=4), Collector()))


def test_a_tiny_temperature_is_greedy_and_does_not_break_its_batch(engine, loaded):
    from services.llm.params import Limits, SamplingRequest, resolve_sampling

    limits = Limits(default_max_new_tokens=16, max_new_tokens_limit=64, context_length=1024)
    config = resolve_sampling(SamplingRequest(temperature=1e-39, max_new_tokens=12, ignore_eos=True), 5, limits)
    assert config.greedy
    neighbour = Collector()
    engine.submit(Sequence(encode(loaded, PROMPTS[1]), SamplingConfig(max_new_tokens=12, ignore_eos=True), neighbour))
    collector = Collector()
    engine.submit(Sequence(encode(loaded, PROMPTS[0]), config, collector))
    text, final = collector.wait()
    assert final.error is None and text == hf_greedy(loaded, PROMPTS[0], 12)
    assert neighbour.wait()[1].error is None


def test_overflowing_logits_fall_back_to_greedy_for_that_row_only():
    from services.llm.sampling import RowSampler, sample

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.1, 0.2]])
    hot = RowSampler.create(SamplingConfig(max_new_tokens=1, temperature=1e-39, seed=1), [0], torch.device("cpu"))
    fine = RowSampler.create(SamplingConfig(max_new_tokens=1, temperature=1.0, seed=1), [0], torch.device("cpu"))
    assert sample(logits, [hot, fine]).tokens[0] == 1


def test_an_internal_error_fails_only_its_batch_and_the_engine_goes_on(engine, loaded):
    broken = Collector()
    engine.submit(Sequence([1, 10**9], SamplingConfig(max_new_tokens=4), broken))  # no such token id
    _, final = broken.wait()
    assert final.error is not None and final.error.code == "INTERNAL"
    assert "Traceback" not in final.error.message
    _, final = run(engine, loaded, PROMPTS[0], max_new_tokens=4)
    assert final.error is None and final.completion_tokens == 4


def test_cancelled_requests_do_not_hold_queue_slots(loaded, settings):
    engine = make_engine(loaded, settings, max_waiting=2)  # not started: nothing leaves the queue
    queued = [Sequence([1, 2], SamplingConfig(max_new_tokens=4), Collector()) for _ in range(2)]
    for seq in queued:
        engine.submit(seq)
        seq.cancel()
    engine.submit(Sequence([1, 2], SamplingConfig(max_new_tokens=4), Collector()))
    assert engine.num_waiting == 1


def test_in_bfloat16_a_packed_step_agrees_with_transformers_and_greedy_runs(settings):
    """The bf16 that `auto` picks on CPUs with native bf16 (and on GPUs): the packed forward's logits agree with
    transformers' own forward in bf16 within bf16's precision, and the engine decodes in it."""
    from services.llm.batch import prefill_logits
    from shared.settings import ModelEntry

    entry = ModelEntry.model_validate({**settings.models[0].model_dump(), "dtype": "bfloat16"})
    bf16 = load_causal_lm(entry, settings)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    prompts = [encode(bf16, p) for p in PROMPTS]
    packed = prefill_logits(bf16.model, prompts).float()
    with torch.inference_mode():
        alone = torch.stack([bf16.model(torch.tensor([p])).logits[0, -1].float() for p in prompts])
    scale = alone.abs().max()
    assert (packed - alone).abs().max() <= 0.02 * scale, "packed bf16 logits drift from transformers' bf16 forward"
    engine = make_engine(bf16, settings)
    engine.start()
    try:
        _, final = run(engine, bf16, PROMPTS[0], max_new_tokens=8)
        assert final.finish_reason is FinishReason.LENGTH and final.completion_tokens == 8
    finally:
        engine.shutdown()
