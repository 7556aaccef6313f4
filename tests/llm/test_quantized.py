"""Quantized bases (bitsandbytes NF4 and int8, on this CPU): loading, the engine and multi-LoRA over them.

peft on the same quantized model is the reference for adapters. NF4 dequantizes its weights and computes in
float32 here, so a row of the engine's batch equals peft's to float32 rounding. int8 (LLM.int8()) quantizes
the activations per token, casts to float16 and computes the outlier columns it finds across the whole batch
in float16: a row's logits move with its neighbours by a few tenths (0.17 measured for the base row), so the
int8 tolerance is 0.5, against adapter effects above 10.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from services.llm.lora import MultiLora
from shared.errors import FailedPrecondition
from shared.loaders import load_causal_lm
from shared.quantization import dense_weight, quantization_config
from shared.settings import ModelEntry
from tests.llm.engine_helpers import PROMPTS, Collector, encode, hf_greedy, make_engine, run

PROMPT = [1, 286, 80, 340, 1237]
# (quantization, the layer type it loads as, max |Δlogit| against peft on the same batch)
QUANTIZED = [("bnb-nf4", "Linear4bit", 1e-4), ("bnb-int8", "Linear8bitLt", 0.5)]


def entry(quantization: str) -> ModelEntry:
    return ModelEntry(
        name=f"tiny-llm-{quantization}",
        kind="llm",
        source="builtin:tiny-llm",
        dtype="float32",
        quantization=quantization,
    )


def save_adapter(settings, folder, seed, **config):
    """A random (non-zero) adapter for the tiny LLM, saved from its full-precision weights as training would."""
    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(seed)
    lora = LoraConfig(
        **({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]} | config),
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # DoRA magnitudes unlike the weight norms, as after training
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-adapters")
    return {
        "rslora": save_adapter(settings, root / "rslora", seed=1, use_rslora=True, lora_alpha=16),
        "dora": save_adapter(settings, root / "dora", seed=2, r=8, use_dora=True),
    }


def logits(model, rows, **kwargs):
    with torch.inference_mode():
        return model(torch.tensor(rows), **kwargs).logits


@pytest.mark.parametrize(("quantization", "layer_type", "_"), QUANTIZED)
def test_a_quantized_base_loads_quantized_with_fewer_weight_bytes(settings, tiny_llm, quantization, layer_type, _):
    loaded = load_causal_lm(entry(quantization), settings)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_type and not q_proj.weight.is_floating_point()
    assert loaded.quantization == quantization
    assert loaded.dtype == torch.float32, "it computes in the entry's dtype"
    assert 0 < loaded.weight_bytes < tiny_llm.weight_bytes
    full = tiny_llm.model.model.layers[0].self_attn.q_proj.weight
    error = (dense_weight(q_proj).float() - full).abs().max() / full.abs().max()
    assert error < 0.2, "the dequantized weight is the full one to quantization error"


@pytest.mark.parametrize(("quantization", "_", "tolerance"), QUANTIZED)
def test_a_mixed_adapter_batch_matches_peft_on_the_same_quantized_base(settings, folders, quantization, _, tolerance):
    reference = PeftModel.from_pretrained(
        load_causal_lm(entry(quantization), settings).model, folders["rslora"], adapter_name="rslora"
    )
    reference.load_adapter(folders["dora"], adapter_name="dora")
    reference.eval()
    served = load_causal_lm(entry(quantization), settings).model
    lora = MultiLora(served, slots=2)
    lora.load(0, folders["dora"])
    lora.load(1, folders["rslora"])
    lora.set_rows([1, None, 0])
    mixed = logits(served, [PROMPT] * 3)
    for row, name in enumerate(("rslora", None, "dora")):
        if name is None:
            with reference.disable_adapter():
                expected = logits(reference, [PROMPT])[0]
        else:
            reference.set_adapter(name)
            expected = logits(reference, [PROMPT])[0]
        torch.testing.assert_close(mixed[row], expected, atol=tolerance, rtol=0)
    effect = (mixed[0] - mixed[1]).abs().max()
    assert effect > 20 * tolerance, "the adapters change the logits far beyond the tolerance"


def test_the_engine_over_an_nf4_base_matches_generate_and_serves_mixed_adapters(settings, adapters):
    """Packed prefill and decode steps, slot attention, the prefix cache and multi-LoRA, over NF4."""
    loaded = load_causal_lm(entry("bnb-nf4"), settings)
    expected = [hf_greedy(loaded, prompt, 10) for prompt in PROMPTS]
    engine = make_engine(loaded, settings)
    engine.start()
    try:
        assert [run(engine, loaded, p, max_new_tokens=10)[0] for p in PROMPTS] == expected
        assert run(engine, loaded, PROMPTS[1], max_new_tokens=10)[0] == expected[1], "a prefix-cache hit"
        choices = [None, *adapters]
        alone = {a: run(engine, loaded, PROMPTS[0], adapter=a)[0] for a in choices}
        assert len(set(alone.values())) == len(choices), "each adapter changes the output"
        collectors = {a: Collector() for a in choices}
        for adapter, collector in collectors.items():
            engine.submit(_sequence(loaded, PROMPTS[0], collector, adapter))
        assert {a: c.wait()[0] for a, c in collectors.items()} == alone
    finally:
        engine.shutdown()


def _sequence(loaded, prompt, collector, adapter):
    from services.llm.engine import Sequence
    from services.llm.params import SamplingConfig

    return Sequence(
        encode(loaded, prompt), SamplingConfig(max_new_tokens=16, ignore_eos=True), collector, adapter=adapter
    )


def test_fp8_is_refused_on_the_cpu_with_what_to_use_instead():
    with pytest.raises(FailedPrecondition, match=r"fp8 needs a GPU with float8 tensor cores.*bnb-nf4 or bnb-int8"):
        quantization_config("fp8", torch.device("cpu"), torch.float32)


def test_a_diffusion_model_cannot_be_quantized():
    with pytest.raises(ValueError, match="quantization applies to llm and embedding models"):
        ModelEntry(name="sd", kind="diffusion", source="builtin:tiny-sd", quantization="bnb-nf4")


def test_an_embedding_model_loads_in_nf4_and_its_vectors_stay_close(settings):
    """The encoder's hidden states through NF4 linear layers: mean-pooled vectors point the same way."""
    from shared.loaders import load_encoder

    full_entry = next(e for e in settings.models if e.kind == "embedding")
    full = load_encoder(full_entry, settings)
    nf4 = load_encoder(full_entry.model_copy(update={"quantization": "bnb-nf4"}), settings)
    assert nf4.weight_bytes < full.weight_bytes
    ids = full.tokenizer(["a function that parses text", "import os"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        vectors = [m.model(**ids).last_hidden_state.mean(1) for m in (full, nf4)]
    similarity = torch.nn.functional.cosine_similarity(*vectors)
    assert (similarity > 0.9).all(), similarity


def test_a_p_tuning_adapter_over_an_nf4_base_prefixes_its_virtual_tokens_like_peft(settings, tmp_path):
    from peft import PromptEncoderConfig

    from services.llm.adapters import LoraAdapterCache
    from services.llm.batch import prefill_logits
    from shared.adapters import AdapterInfo, AdapterStore

    torch.manual_seed(6)
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32)
    peft_model = get_peft_model(load_causal_lm(settings.models[0], settings).model, config)
    store = AdapterStore(tmp_path / "adapters")
    store.save(AdapterInfo("prompted", "llm", "tiny-llm", method="p_tuning"), peft_model.save_pretrained)
    served = load_causal_lm(entry("bnb-nf4"), settings).model
    cache = LoraAdapterCache(served, store, 2, "tiny-llm", "builtin:tiny-llm")
    keys = [cache.acquire("prompted"), None]
    prefixes = [cache.prefix(k) for k in keys]
    cache.set_rows([keys[0]] * (5 + len(PROMPT)) + [None] * len(PROMPT), packed=True)
    mixed = prefill_logits(served, [PROMPT, PROMPT], prefixes)
    reference = PeftModel.from_pretrained(load_causal_lm(entry("bnb-nf4"), settings).model, store.path("prompted"))
    with torch.inference_mode():
        expected = reference.eval()(input_ids=torch.tensor([PROMPT])).logits[:, -1]
        base = served(torch.tensor([PROMPT])).logits[:, -1]
    torch.testing.assert_close(mixed[0:1], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1:2], base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed[0:1], base, atol=1e-2), "the virtual tokens change the output"
