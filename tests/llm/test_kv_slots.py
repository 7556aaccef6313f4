"""The slot KV cache: rows that sequences keep from admission to the end, admitted by a memory budget.

Unit checks of `SlotKV`, then the engine on the tiny model with a budget that holds two sequences: more
requests wait their turn and all finish with their solo texts; one that could never fit is refused up
front, also through the service; joining and leaving move no running sequence's KV.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from services.llm.engine import Sequence
from services.llm.kv_slots import MIN_CAPACITY, SlotKV, capacity_for
from services.llm.params import SamplingConfig
from shared.errors import ResourceExhausted
from shared.loaders import load_causal_lm
from tests.conftest import start_server, stop_server
from tests.llm.engine_helpers import Collector, GatedCollector, encode, make_engine, run
from tests.scrape import metric_value


class Config:  # a decoder's shape: 2 layers, 2 KV heads of 4 dims (float32: 128 bytes a token)
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_size = 2, 4, 2, 4, 16


def slot_kv(budget_tokens: int, max_rows: int = 8) -> SlotKV:
    kv = SlotKV(Config, dtype=torch.float32, device=torch.device("cpu"), budget_bytes=0, max_rows=max_rows)
    kv.budget_bytes = budget_tokens * kv.bytes_per_token
    return kv


def test_sequences_take_rows_of_their_size_class_and_give_them_back():
    kv = slot_kv(budget_tokens=4 * 1024)
    assert kv.bytes_per_token == 2 * 2 * 2 * 4 * 4
    assert [capacity_for(n) for n in (1, 256, 257, 900)] == [MIN_CAPACITY, 256, 512, 1024]
    short, long_ = kv.reserve(100), kv.reserve(900)
    kv.ensure()
    assert (short.capacity, short.row, long_.capacity, long_.row) == (256, 0, 1024, 0)
    assert kv.nbytes == (256 + 1024) * kv.bytes_per_token, "a long sequence does not lengthen the short rows"
    kv.free(long_)
    assert kv.nbytes == 256 * kv.bytes_per_token, "a class's memory goes back with its last sequence"
    assert kv.reserve(50).row == 1


def test_admission_counts_every_reservation_against_the_budget():
    kv = slot_kv(budget_tokens=2 * 256)
    assert kv.max_tokens_alone == 512
    assert kv.fits(200)
    kv.reserve(200)
    assert kv.fits(200), "two rows of 256 fit"
    kv.reserve(200)  # reserved, not yet allocated: still counted
    assert not kv.fits(200), "a third would need four rows of 256"
    assert not kv.fits(300), "nor does a row of 512 next to them"
    kv.ensure()
    assert kv.nbytes == 2 * 256 * kv.bytes_per_token <= kv.budget_bytes


def test_growing_a_class_keeps_its_rows_kv_and_rows_that_fit_never_move():
    kv = slot_kv(budget_tokens=8 * 256)
    first = kv.reserve(100)
    kv.ensure()
    keys = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    kv.write(first, 0, [(keys, -keys), (2 * keys, -2 * keys)])
    for _ in range(2):
        kv.reserve(100)
    kv.ensure()  # 1 row -> 4 rows (three used): copied once
    torch.testing.assert_close(kv.row_layers(first, 3)[1][0], 2 * keys)
    storage = kv.layer(256, 0)[0].data_ptr()
    for _ in range(5):  # join and leave within the four rows
        joining = kv.reserve(100)
        kv.ensure()
        kv.free(joining)
    assert kv.layer(256, 0)[0].data_ptr() == storage, "joining and leaving moved the buffer"
    torch.testing.assert_close(kv.row_layers(first, 3)[0][1], -keys)


@pytest.fixture(scope="module")
def loaded(settings):
    return load_causal_lm(settings.models[0], settings)


def two_sequence_engine(loaded, settings, **options):
    """An engine whose KV budget holds two sequences of up to 256 positions at once."""
    probe = make_engine(loaded, settings)
    budget = 2 * MIN_CAPACITY * probe.kv.bytes_per_token
    engine = make_engine(loaded, settings, kv_cache_bytes=budget, **options)
    engine.start()
    return engine


def warm_up_forwards(engine, model) -> int:
    """How many forward passes of `model` the engine's warm-up runs."""
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine.warm_up()
    finally:
        hook.remove()
    return len(calls)


def test_the_warm_up_step_runs_the_model_once_and_leaves_no_rows_or_memory_behind(loaded, settings):
    engine = make_engine(loaded, settings)
    assert warm_up_forwards(engine, loaded.model) == 1
    assert engine.kv.nbytes == 0 and engine.kv.fits(engine.kv.max_tokens_alone), "its rows are all free again"


def test_the_warm_up_is_skipped_when_the_kv_budget_cannot_hold_its_rows(loaded, settings):
    probe = make_engine(loaded, settings)
    engine = make_engine(loaded, settings, kv_cache_bytes=2 * MIN_CAPACITY * probe.kv.bytes_per_token)
    assert warm_up_forwards(engine, loaded.model) == 0
    assert engine.kv.nbytes == 0 and engine.kv.fits(MIN_CAPACITY), "nothing is left reserved"


def test_requests_beyond_the_kv_budget_wait_their_turn_and_all_finish_with_their_solo_text(loaded, settings):
    solo_engine = make_engine(loaded, settings)
    solo_engine.start()
    prompts = ["def parse(text):", "x = [", "# Copyright", "class A:", "for i in", "import os"]
    try:
        alone = [run(solo_engine, loaded, p, max_new_tokens=24)[0] for p in prompts]
    finally:
        solo_engine.shutdown()
    engine = two_sequence_engine(loaded, settings)
    most = []
    original_forward = engine._forward

    def watched_forward(decoding, plan):
        most.append((engine.num_running, engine.kv.nbytes))
        original_forward(decoding, plan)

    engine._forward = watched_forward
    try:
        collectors = [Collector() for _ in prompts]
        for prompt, collector in zip(prompts, collectors, strict=True):
            config = SamplingConfig(max_new_tokens=24, ignore_eos=True)
            engine.submit(Sequence(encode(loaded, prompt), config, collector))
        texts = [c.wait(120)[0] for c in collectors]
        assert texts == alone
        assert max(n for n, _ in most) <= 2, "never more sequences than the budget holds"
        assert max(b for _, b in most) <= engine.kv.budget_bytes
    finally:
        engine.shutdown()


def test_a_request_that_could_never_fit_is_refused_at_submit_with_the_limit_and_blocks_nobody(loaded, settings):
    engine = two_sequence_engine(loaded, settings)
    gate = GatedCollector()
    try:
        engine.submit(Sequence(encode(loaded, "x = ["), SamplingConfig(max_new_tokens=200, ignore_eos=True), gate))
        assert gate.holding.wait(60)
        after = Collector()
        too_long = SamplingConfig(max_new_tokens=2 * MIN_CAPACITY, ignore_eos=True)  # past one 512-token row
        with pytest.raises(ResourceExhausted, match=r"llm.kv_cache_bytes.* at most 512 tokens"):
            engine.submit(Sequence(encode(loaded, "def parse(text):"), too_long, Collector()))
        engine.submit(Sequence(encode(loaded, "# Copyright"), SamplingConfig(max_new_tokens=4), after))
        gate.release()
        _, done = after.wait()
        assert done.error is None, "the request behind it ran"
    finally:
        gate.release()
        engine.shutdown()


@pytest.fixture(scope="module")
def small_kv_server(data_dir, tmp_path_factory):
    """A server whose KV budget holds 32,768 positions of tiny-llm (512 bytes each) for one request."""
    env = {"MODELWORKS_LLM__KV_CACHE_BYTES": str(16 * 2**20)}
    server = start_server("llm", data_dir, tmp_path_factory.mktemp("small-kv"), env)
    yield server
    stop_server(server)


def test_the_service_refuses_a_request_past_the_kv_budget_up_front_and_stays_healthy(small_kv_server):
    with grpc.insecure_channel(small_kv_server.address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        big = llm_pb2.GenerateRequest(prompt="x = [", sampling=llm_pb2.SamplingParams(max_new_tokens=40_000))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(big)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "llm.kv_cache_bytes, 16 MiB" in caught.value.details()
        assert "at most 32768 tokens" in caught.value.details()
        fits = llm_pb2.GenerateRequest(prompt="x = [", sampling=llm_pb2.SamplingParams(max_new_tokens=30_000))
        stream = stub.GenerateStream(fits)
        assert next(stream).text is not None, "a request that fits runs"
        stream.cancel()
        assert metric_value(small_kv_server, "modelworks_llm_kv_cache_budget_bytes", model="tiny-llm") == 16 * 2**20
