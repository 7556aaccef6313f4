"""Bounded LoRA serving: the rank and target limits at load, all-or-nothing re-layouts, and the slots'
memory held in the KV budget.

Adapters are made offline with peft on tiny-llm and served by a real engine; a failed allocation is
injected into the re-layout, as the suite injects a GPU's out-of-memory elsewhere.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model

from services.llm.adapters import LoraAdapterCache
from services.llm.engine import LLMEngine, Sequence, eos_token_ids
from services.llm.kv_slots import MIN_CAPACITY, SlotKV, kv_shape
from services.llm.lora import DEFAULT_LIMITS, LoraLimits, MultiLora, MultiLoraLinear
from services.llm.params import SamplingConfig
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition, ResourceExhausted, ServiceError
from shared.loaders import load_causal_lm
from tests.llm.engine_helpers import Collector, encode, run
from tests.llm.test_kv_slots import Config
from tests.llm.test_lora import PROMPT, logits, peft_logits, save_adapter


def fresh_model(settings):
    """A model of its own: adapters wrap the model's layers in place."""
    return load_causal_lm(settings.models[0], settings)


def store_adapter(settings, store, name, seed, **config):
    """Save a LoRA adapter for tiny-llm whose weights change greedy outputs, into `store`."""
    model = fresh_model(settings).model
    torch.manual_seed(seed)
    lora = LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]} | config))
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_" in pname:
                param.normal_(0, 0.5)
    store.save(
        AdapterInfo(name=name, kind="llm", base_model="tiny-llm"),
        lambda folder: peft_model.save_pretrained(folder, save_embedding_layers=False),
    )


def save_without_embedding_weights(settings, folder, seed, targets):
    """An adapter on `targets` saved as the fine-tune worker saves one (no full embedding weights)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(fresh_model(settings).model, config).save_pretrained(folder, save_embedding_layers=False)
    return folder


def serving_engine(loaded, store, limits=DEFAULT_LIMITS, **options):
    """A started engine serving `store`'s adapters within `limits`."""
    cache = LoraAdapterCache(loaded.model, store, 8, "tiny-llm", "builtin:tiny-llm", limits=limits)
    engine = LLMEngine(
        loaded.model,
        loaded.tokenizer,
        model_name="tiny-llm",
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        adapters=cache,
        **({"max_batch_size": 8, "max_waiting": 16, "max_prompt_tokens": 4096} | options),
    )
    engine.start()
    return engine


def kv_bytes_per_token(loaded) -> int:
    layers, kv_heads, head_dim = kv_shape(loaded.model.config)
    return 2 * layers * kv_heads * head_dim * loaded.model.dtype.itemsize


def refusal(engine, loaded, adapter, max_new_tokens=8):
    """The error a request for `adapter` ends with: refused at submit, or when its adapter loads."""
    collector = Collector()
    config = SamplingConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    try:
        engine.submit(Sequence(encode(loaded, "x = ["), config, collector, adapter=adapter))
    except ServiceError as refused:
        return refused
    _, final = collector.wait()
    assert final.error is not None, "the request was expected to be refused"
    return final.error


# -- rank ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "rank"),
    [({"r": 16}, 16), ({"r": 4, "rank_pattern": {"v_proj": 32}}, 32)],
    ids=["r", "rank_pattern"],
)
def test_an_adapter_past_the_rank_limit_is_refused_naming_its_rank_and_the_setting(settings, tmp_path, config, rank):
    folder = save_adapter(settings, tmp_path / "wide", seed=1, **config)
    with pytest.raises(FailedPrecondition) as refused:
        MultiLora(fresh_model(settings).model, slots=2, limits=LoraLimits(max_rank=8)).load(0, folder)
    assert f"'wide' has LoRA rank {rank}" in refused.value.message
    assert "up to 8 (llm.max_lora_rank)" in refused.value.message


def test_the_weights_rank_counts_when_the_config_understates_it(settings, tmp_path):
    folder = save_adapter(settings, tmp_path / "lying", seed=1, r=16)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": 4}))
    lora = MultiLora(fresh_model(settings).model, slots=2, limits=LoraLimits(max_rank=8))
    with pytest.raises(FailedPrecondition, match="has LoRA rank 16"):
        lora.load(0, folder)
    assert lora.rank == 0 and not lora.layers, "nothing was laid out for it"


def test_an_adapter_at_the_rank_limit_is_served(settings, tmp_path):
    folder = save_adapter(settings, tmp_path / "a", seed=1, r=8)
    model = fresh_model(settings).model
    lora = MultiLora(model, slots=2, limits=LoraLimits(max_rank=8))
    lora.load(0, folder)
    lora.set_rows([0])
    torch.testing.assert_close(logits(model, [PROMPT]), peft_logits(settings, folder, [PROMPT]))


# -- embedding and output-head targets ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_embedding_and_output_head_targets_are_refused_by_default_naming_the_module(settings, tmp_path, target):
    folder = save_without_embedding_weights(settings, tmp_path / "vocab", 1, ["q_proj", target])
    with pytest.raises(FailedPrecondition) as refused:
        MultiLora(fresh_model(settings).model, slots=2).load(0, folder)
    module = "lm_head" if target == "lm_head" else "model.embed_tokens"
    assert f"targets {module!r}" in refused.value.message
    assert "llm.allow_embedding_lora_targets" in refused.value.message


def test_an_lm_head_adapter_is_served_like_peft_when_allowed(settings, tmp_path):
    folder = save_without_embedding_weights(settings, tmp_path / "head", 2, ["q_proj", "lm_head"])
    model = fresh_model(settings).model
    lora = MultiLora(model, slots=2, limits=LoraLimits(allow_embedding_targets=True))
    lora.load(1, folder)
    lora.set_rows([1])
    torch.testing.assert_close(logits(model, [PROMPT]), peft_logits(settings, folder, [PROMPT]))


def test_embedding_lora_is_refused_even_when_allowed_since_only_linear_layers_take_slots(settings, tmp_path):
    folder = save_without_embedding_weights(settings, tmp_path / "embedding", 3, ["embed_tokens"])
    lora = MultiLora(fresh_model(settings).model, slots=2, limits=LoraLimits(allow_embedding_targets=True))
    with pytest.raises(FailedPrecondition, match=r"embedding layer 'model\.embed_tokens'; only linear layers"):
        lora.load(0, folder)


def test_the_engine_refuses_a_too_wide_adapter_and_keeps_serving_the_others(settings, tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    store_adapter(settings, store, "narrow", seed=3)
    store_adapter(settings, store, "wide", seed=4, r=16)
    loaded = fresh_model(settings)
    engine = serving_engine(loaded, store, limits=LoraLimits(max_rank=8))
    try:
        before = run(engine, loaded, "x = [", adapter="narrow")[0]
        error = refusal(engine, loaded, "wide")
        assert isinstance(error, FailedPrecondition) and "llm.max_lora_rank" in error.message
        assert run(engine, loaded, "x = [", adapter="narrow")[0] == before
        assert engine.adapters.loaded == ["narrow"]
    finally:
        engine.shutdown()


# -- all-or-nothing re-layout ---------------------------------------------------------------------------


def fail_allocations_after(monkeypatch, calls):
    """Make the re-layout's allocation of a layer's buffers fail from call `calls` + 1 on (a device OOM)."""
    original = MultiLoraLinear.relaid
    count = [0]

    def relaid(self, *args):
        count[0] += 1
        if count[0] > calls:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, *args)

    monkeypatch.setattr(MultiLoraLinear, "relaid", relaid)
    return count


def test_a_re_layout_that_runs_out_of_memory_midway_changes_no_layer(settings, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "adapters")
    store_adapter(settings, store, "a", seed=5)
    store_adapter(settings, store, "b", seed=6)
    store_adapter(settings, store, "wider", seed=7, r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    loaded = fresh_model(settings)
    engine = serving_engine(loaded, store)
    try:
        expected = {name: run(engine, loaded, "def parse(text):", adapter=name)[0] for name in (None, "a", "b")}
        assert len(set(expected.values())) == 3, "each adapter changes the output"
        lora = engine.adapters._lora
        layout = (lora.rank, lora.slots, {n: layer.lora_A for n, layer in lora.layers.items()}, lora.nbytes)
        count = fail_allocations_after(monkeypatch, calls=3)  # three of the six wrapped layers re-laid
        error = refusal(engine, loaded, "wider")
        assert count[0] == 4, "it failed midway through the layers"
        assert isinstance(error, ResourceExhausted)
        assert "not enough memory to lay out LoRA slots of rank 8" in error.message
        assert (lora.rank, lora.slots, {n: layer.lora_A for n, layer in lora.layers.items()}, lora.nbytes) == layout
        assert engine.kv.held_bytes == lora.nbytes, "the budget holds the old layout only"
        for name, text in expected.items():
            assert run(engine, loaded, "def parse(text):", adapter=name)[0] == text
        monkeypatch.undo()
        served = run(engine, loaded, "def parse(text):", adapter="wider")[0]
        assert served not in expected.values(), "once memory allows it the adapter loads"
        for name, text in expected.items():
            assert run(engine, loaded, "def parse(text):", adapter=name)[0] == text, "re-laid, not lost"
    finally:
        engine.shutdown()


def test_a_re_layout_frees_the_old_buffers_at_once_as_the_budget_assumes(settings, tmp_path):
    """The budget counts the old layout as freed when the new one is adopted: nothing may keep it alive, not
    even the views a layer keeps between forwards, while only base-model rows run."""
    a = save_adapter(settings, tmp_path / "a", seed=1)
    wider = save_adapter(settings, tmp_path / "wider", seed=2, r=8)
    base = fresh_model(settings).model
    lora = MultiLora(base, slots=1)
    lora.load(0, a)
    lora.set_rows([0])
    logits(base, [PROMPT])  # the layers now keep views into their buffers
    old = [weakref.ref(layer.lora_A) for layer in lora.layers.values()]
    lora.load(1, wider)  # more slots and a larger rank: every layer re-laid
    lora.set_rows([None])
    logits(base, [PROMPT])  # a base-model forward: no LoRA product, so no layer refreshes its views
    gc.collect()
    assert lora.rank == 8 and not [ref for ref in old if ref() is not None], "an old buffer outlived its re-layout"


# -- the KV budget --------------------------------------------------------------------------------------


def test_held_bytes_count_against_admission_and_kept_rows_give_way_to_them():
    row = 2 * MIN_CAPACITY * 128  # a kept class's row and its spare row (Config: 128 bytes a token)
    cpu = torch.device("cpu")
    kv = SlotKV(Config, dtype=torch.float32, device=cpu, budget_bytes=row, max_rows=8, static_buffers=True)
    slot = kv.reserve(100)
    kv.ensure()
    assert not kv.hold(1), "past the budget next to a reserved row"
    kv.free(slot)  # kept for CUDA graphs
    assert kv.nbytes == row
    assert kv.hold(1) and kv.held_bytes == 1
    assert kv.nbytes == 0, "the kept class gave its memory up"
    assert not kv.fits(100), "a row no longer fits next to the held byte"
    assert kv.hold(0) and kv.fits(100)


def test_lora_slots_are_held_in_the_kv_budget_and_shrink_what_one_request_may_reserve(settings, tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    store_adapter(settings, store, "a", seed=8)
    loaded = fresh_model(settings)
    engine = serving_engine(loaded, store, kv_cache_bytes=2 * MIN_CAPACITY * kv_bytes_per_token(loaded))
    try:
        assert engine.kv.max_tokens_alone == 2 * MIN_CAPACITY
        run(engine, loaded, "x = [", adapter="a")
        assert engine.kv.held_bytes == engine.adapters.lora_bytes > 0
        assert engine.kv.max_tokens_alone == MIN_CAPACITY, "a 512-token row no longer fits next to the slots"
        error = refusal(engine, loaded, None, max_new_tokens=MIN_CAPACITY)
        assert isinstance(error, ResourceExhausted) and "at most 256 tokens" in error.message
    finally:
        engine.shutdown()


def test_an_adapter_whose_slots_do_not_fit_the_budget_is_refused_naming_the_bytes(settings, tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    store_adapter(settings, store, "a", seed=9)
    loaded = fresh_model(settings)
    budget = MIN_CAPACITY * kv_bytes_per_token(loaded) + 1024  # one request's row, and 1 KiB
    engine = serving_engine(loaded, store, kv_cache_bytes=budget)
    try:
        error = refusal(engine, loaded, "a")
        assert isinstance(error, ResourceExhausted)
        assert "needs LoRA slots of rank 4" in error.message and "llm.kv_cache_bytes" in error.message
        assert engine.kv.held_bytes == 0 and engine.adapters.loaded == []
        base = run(engine, loaded, "x = [")[1]
        assert base.error is None, "the base model still serves"
    finally:
        engine.shutdown()
