"""Failures stay inside their request: a bad prefill, an out-of-memory, a fatal device error, an oversized prompt.

Faults are injected into the model's forward (there is no GPU here to run out of memory or to fault), and
only for a prefill that carries a marker token, so the running batch's decode steps are untouched. A
`GatedCollector` holds the engine while the faulty request is queued, so it is admitted next to a
sequence that is still running, by construction.
"""

from __future__ import annotations

import pytest
import torch

from services.llm.engine import FinishReason, Sequence
from services.llm.params import SamplingConfig
from shared.errors import InvalidArgument, Unavailable
from shared.loaders import load_causal_lm
from tests.harness import wait_for
from tests.llm.engine_helpers import PROMPTS, Collector, GatedCollector, encode, make_engine, run

MARK = 7  # a token id: a prefill whose prompt holds it fails as the test says


@pytest.fixture
def loaded(settings):
    return load_causal_lm(settings.models[0], settings)  # fresh: the fault is patched into this copy only


def inject_prefill_fault(monkeypatch, loaded, error: BaseException) -> None:
    forward = loaded.model.forward

    def faulty(*args, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] > 1 and bool((input_ids == MARK).any()):
            raise error
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", faulty)


def poisoned_prompt(loaded) -> list[int]:
    return [loaded.tokenizer.bos_token_id, MARK, *encode(loaded, "y = 1")[1:]]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("index out of range in self"), "INTERNAL"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "RESOURCE_EXHAUSTED"),
    ],
    ids=["bad input", "out of memory"],
)
def test_a_failing_prefill_fails_only_the_admitted_sequences(monkeypatch, loaded, settings, error, code):
    engine = make_engine(loaded, settings)
    engine.start()
    try:
        alone, _ = run(engine, loaded, PROMPTS[1], max_new_tokens=40)
        inject_prefill_fault(monkeypatch, loaded, error)
        runner = GatedCollector()
        engine.submit(Sequence(encode(loaded, PROMPTS[1]), SamplingConfig(max_new_tokens=40, ignore_eos=True), runner))
        assert runner.holding.wait(60)
        bad = Collector()
        engine.submit(Sequence(poisoned_prompt(loaded), SamplingConfig(max_new_tokens=8, ignore_eos=True), bad))
        runner.release()  # the next step admits `bad` while `runner` is mid-generation
        _, failed = bad.wait()
        assert failed.error is not None and failed.error.code == code
        assert "Traceback" not in failed.error.message and "index out of range" not in failed.error.message
        text, final = runner.wait()
        assert final.error is None and final.finish_reason is FinishReason.LENGTH
        assert text == alone, "the running sequence went on as if nothing happened"
        _, after = run(engine, loaded, PROMPTS[0], max_new_tokens=4)
        assert after.error is None and engine.alive
    finally:
        engine.shutdown()


def test_a_fatal_device_error_stops_the_engine_and_fails_everything_with_unavailable(monkeypatch, loaded, settings):
    engine = make_engine(loaded, settings, max_batch_size=2)
    deaths = []
    engine.start(on_death=deaths.append)
    try:
        inject_prefill_fault(monkeypatch, loaded, RuntimeError("CUDA error: an illegal memory access was encountered"))
        runner = GatedCollector()
        engine.submit(
            Sequence(encode(loaded, PROMPTS[0]), SamplingConfig(max_new_tokens=10**5, ignore_eos=True), runner)
        )
        assert runner.holding.wait(60)
        bad, queued = Collector(), Collector()
        engine.submit(Sequence(poisoned_prompt(loaded), SamplingConfig(max_new_tokens=8), bad))
        engine.submit(Sequence(encode(loaded, "z"), SamplingConfig(max_new_tokens=8), queued))  # batch is full
        runner.release()
        for collector in (runner, bad, queued):
            _, final = collector.wait()
            assert isinstance(final.error, Unavailable), final
            assert "restarting" in final.error.message
        assert len(deaths) == 1 and "illegal memory access" in str(deaths[0])
        wait_for(lambda: not engine.alive, 60, "the engine thread to end")  # it fails the requests first
        with pytest.raises(Unavailable):
            engine.submit(Sequence(encode(loaded, "z"), SamplingConfig(max_new_tokens=8), Collector()))
    finally:
        engine.shutdown()


def test_a_prompt_over_the_prompt_limit_is_refused_at_submit_and_blocks_nobody(loaded, settings):
    engine = make_engine(loaded, settings, max_prompt_tokens=8)
    engine.start()
    try:
        long_prompt = encode(loaded, "word " * 30)
        assert len(long_prompt) > 8
        with pytest.raises(InvalidArgument, match="at most 8 tokens"):
            engine.submit(Sequence(long_prompt, SamplingConfig(max_new_tokens=4), Collector()))
        assert engine.num_waiting == 0
        _, after = run(engine, loaded, "x", max_new_tokens=4)
        assert after.error is None and after.completion_tokens == 4
    finally:
        engine.shutdown()
