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


def test_an_adapter_for_other_layers_is_refused_not_silently_ignored(settings, tmp_path, base):
    folder = save_adapter(settings, tmp_path / "a", seed=1)
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    renamed = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    with pytest.raises(FailedPrecondition, match="does not match a linear layer"):
        MultiLora(base, slots=1).load(0, folder)


def test_unsupported_lora_variants_are_refused(settings, tmp_path, base):
    folder = save_adapter(settings, tmp_path / "a", seed=1)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(FailedPrecondition, match="use_dora"):
        MultiLora(base, slots=1).load(0, folder)
