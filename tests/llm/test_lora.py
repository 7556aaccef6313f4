"""Batched multi-LoRA against peft's own implementation of the same adapters."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from services.llm.lora import MultiLora
from shared.errors import FailedPrecondition
from shared.loaders import load_causal_lm

PROMPT = [1, 286, 80, 340, 1237]


def save_adapter(settings, folder, seed, **config):
    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(seed)
    lora = LoraConfig(
        **({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | config), init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor(ids)).logits


def peft_logits(settings, folder, ids):
    model = PeftModel.from_pretrained(load_causal_lm(settings.models[0], settings).model, folder)
    return logits(model.eval(), ids)


@pytest.fixture
def base(settings):
    return load_causal_lm(settings.models[0], settings).model


def test_one_adapter_matches_peft(settings, tmp_path, base):
    folder = save_adapter(settings, tmp_path / "a", seed=1, use_rslora=True, lora_alpha=16)
    lora = MultiLora(base, slots=2)
    lora.load(0, folder)
    lora.set_rows([0])
    torch.testing.assert_close(logits(base, [PROMPT]), peft_logits(settings, folder, [PROMPT]))


def test_rows_with_different_adapters_and_ranks_match_peft_in_one_batch(settings, tmp_path, base):
    a = save_adapter(settings, tmp_path / "a", seed=1)
    b = save_adapter(settings, tmp_path / "b", seed=2, r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])
    reference = logits(base, [PROMPT])
    lora = MultiLora(base, slots=1)
    lora.load(0, a)
    lora.load(1, b)  # a larger rank and more slots: the loaded slot is re-laid, not lost
    lora.set_rows([1, None, 0])
    mixed = logits(base, [PROMPT] * 3)
    torch.testing.assert_close(mixed[1:2], reference)
    torch.testing.assert_close(mixed[0:1], peft_logits(settings, b, [PROMPT]))
    torch.testing.assert_close(mixed[2:3], peft_logits(settings, a, [PROMPT]))
    lora.clear(1)
    lora.set_rows([1])
    torch.testing.assert_close(logits(base, [PROMPT]), reference)


def test_an_adapter_loaded_between_forwards_is_served_even_when_it_re_lays_the_slots(settings, tmp_path, base):
    a = save_adapter(settings, tmp_path / "a", seed=1)  # rank 4
    b = save_adapter(settings, tmp_path / "b", seed=2, r=8)
    c = save_adapter(settings, tmp_path / "c", seed=3, r=8)
    lora = MultiLora(base, slots=2)
    lora.load(1, a)
    lora.set_rows([1])  # slots 0-1 of rank 4: 8 columns
    torch.testing.assert_close(logits(base, [PROMPT]), peft_logits(settings, a, [PROMPT]))
    lora.load(0, b)  # rank 8: the stacked weights are new tensors
    lora.set_rows([0])  # slot 0 of rank 8: 8 columns again, of the new weights
    torch.testing.assert_close(logits(base, [PROMPT]), peft_logits(settings, b, [PROMPT]))
    lora.set_rows([0, 1])
    torch.testing.assert_close(logits(base, [PROMPT] * 2)[1:2], peft_logits(settings, a, [PROMPT]))
    lora.load(0, c)  # written in place over b
    lora.set_rows([0])
    torch.testing.assert_close(logits(base, [PROMPT]), peft_logits(settings, c, [PROMPT]))


def test_an_adapter_for_other_layers_is_refused_not_silently_ignored(settings, tmp_path, base):
    folder = save_adapter(settings, tmp_path / "a", seed=1)
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    renamed = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    with pytest.raises(FailedPrecondition, match="does not match a linear layer"):
        MultiLora(base, slots=1).load(0, folder)


def test_a_dora_adapter_claiming_dora_without_magnitudes_is_refused(settings, tmp_path, base):
    folder = save_adapter(settings, tmp_path / "a", seed=1)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(FailedPrecondition, match="lacks magnitude"):
        MultiLora(base, slots=1).load(0, folder)


def test_modules_to_save_is_refused(settings, tmp_path, base):
    folder = save_adapter(settings, tmp_path / "a", seed=1)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["lm_head"]}))
    with pytest.raises(FailedPrecondition, match="modules_to_save"):
        MultiLora(base, slots=1).load(0, folder)


def dora_adapter(settings, folder, seed, **config):
    """A DoRA adapter whose magnitudes are not the base weight norms (as after training)."""
    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(seed)
    lora = LoraConfig(
        **({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]} | config),
        init_lora_weights=False,
        use_dora=True,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    peft_model.save_pretrained(folder)
    return folder


def test_dora_and_rslora_adapters_match_peft_mixed_in_one_batch(settings, tmp_path, base):
    dora = dora_adapter(settings, tmp_path / "dora", seed=3)
    rsdora = dora_adapter(settings, tmp_path / "rsdora", seed=4, r=8, use_rslora=True, lora_alpha=16)
    plain = save_adapter(settings, tmp_path / "plain", seed=5, use_rslora=True)
    reference = logits(base, [PROMPT])
    lora = MultiLora(base, slots=3)
    for slot, folder in enumerate((dora, rsdora, plain)):
        lora.load(slot, folder)
    lora.set_rows([0, None, 1, 2])
    mixed = logits(base, [PROMPT] * 4)
    torch.testing.assert_close(mixed[0:1], peft_logits(settings, dora, [PROMPT]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1:2], reference)
    torch.testing.assert_close(mixed[2:3], peft_logits(settings, rsdora, [PROMPT]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[3:4], peft_logits(settings, plain, [PROMPT]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed[0:1], reference, atol=1e-2), "the DoRA adapter changes the output"


def test_a_p_tuning_adapter_prefixes_its_virtual_tokens_like_peft_next_to_other_rows(settings, tmp_path, base):
    from peft import PromptEncoderConfig

    from services.llm.adapters import LoraAdapterCache
    from services.llm.batch import prefill_logits
    from shared.adapters import AdapterInfo, AdapterStore

    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(6)
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32)
    peft_model = get_peft_model(model, config)
    store = AdapterStore(tmp_path / "adapters")
    store.save(AdapterInfo("prompted", "llm", "tiny-llm", method="p_tuning"), peft_model.save_pretrained)
    lora_folder = save_adapter(settings, tmp_path / "lora", seed=7)
    store.save(AdapterInfo("plain", "llm", "tiny-llm"), lambda folder: _copy(lora_folder, folder))

    cache = LoraAdapterCache(base, store, 4, "tiny-llm", "builtin:tiny-llm")
    assert cache.virtual_tokens("prompted") == 5 and cache.virtual_tokens("plain") == 0
    keys = [cache.acquire("prompted"), None, cache.acquire("plain")]
    prompts, prefixes = [PROMPT, PROMPT[:3], PROMPT], [cache.prefix(k) for k in keys]
    virtual = [0 if p is None else p.shape[0] for p in prefixes]
    cache.set_rows([k for k, p, v in zip(keys, prompts, virtual, strict=True) for _ in range(v + len(p))], packed=True)
    mixed = prefill_logits(base, prompts, prefixes)

    reference = PeftModel.from_pretrained(load_causal_lm(settings.models[0], settings).model, store.path("prompted"))
    with torch.inference_mode():
        expected = reference.eval()(input_ids=torch.tensor([PROMPT])).logits[:, -1]
    torch.testing.assert_close(mixed[0:1], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1:2], logits(base_without_adapters(settings), [PROMPT[:3]])[:, -1])
    torch.testing.assert_close(mixed[2:3], peft_logits(settings, lora_folder, [PROMPT])[:, -1], rtol=1e-4, atol=1e-4)


def base_without_adapters(settings):
    return load_causal_lm(settings.models[0], settings).model


def _copy(source, target):
    import shutil

    for item in source.iterdir():
        shutil.copy2(item, target / item.name)


def test_a_request_reads_its_adapters_metadata_once_and_the_engine_not_again(settings, tmp_path, base):
    """The request resolves the adapter's version when it arrives; acquiring that version on the engine
    thread reads nothing more once it is loaded (a first load checks the version once more, after its files)."""
    from services.llm.adapters import LoraAdapterCache
    from shared.adapters import AdapterInfo, AdapterStore

    class CountingStore(AdapterStore):
        reads = 0

        def get(self, name):
            CountingStore.reads += 1
            return super().get(name)

    store = CountingStore(tmp_path / "adapters")
    lora_folder = save_adapter(settings, tmp_path / "lora", seed=7)
    store.save(AdapterInfo("plain", "llm", "tiny-llm"), lambda folder: _copy(lora_folder, folder))
    cache = LoraAdapterCache(base, store, 4, "tiny-llm", "builtin:tiny-llm")
    first = cache.acquire("plain", cache.resolve("plain").version)
    assert CountingStore.reads == 2, "the request's read and the first load's check after the files"
    cache.release(first)
    again = cache.acquire("plain", cache.resolve("plain").version)
    assert again == first and CountingStore.reads == 3, "the next request reads once, the engine not at all"
