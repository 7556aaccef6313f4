"""Training in less memory: QLoRA on an NF4/int8 base, gradient checkpointing, 8-bit optimizers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from services.finetune.hyperparams import Hyperparameters, resolve
from services.finetune.samples import llm_sample_jsonl
from services.finetune.training.errors import TrainingInputError
from services.finetune.training.launch import train_here
from services.finetune.training.memory import activations_kept
from services.finetune.training.recipe import load_recipe
from services.llm.lora import MultiLora
from shared.errors import InvalidArgument
from shared.loaders import load_causal_lm
from tests.finetune.test_training import CPU, _context, spec_for
from tests.llm.test_quantized import entry


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "data.jsonl"
    path.write_bytes(llm_sample_jsonl())
    return path


def trained_recipe(settings, spec):
    recipe = load_recipe("llm")(_context(spec, settings, None))
    recipe.setup()
    return recipe, recipe.train()


def saved_activation_bytes(recipe) -> int:
    recipe.model.train()
    return activations_kept(
        recipe.model, lambda: recipe.loss_sum(recipe.model, recipe.batch_of(recipe.split.train[:4]))[0]
    )


def test_gradient_checkpointing_gives_the_same_losses_while_keeping_fewer_activations(settings, dataset, tmp_path):
    plain, plain_result = trained_recipe(settings, spec_for(dataset, tmp_path / "a", max_steps=4))
    checkpointed, result = trained_recipe(
        settings, spec_for(dataset, tmp_path / "b", max_steps=4, gradient_checkpointing=True)
    )
    assert checkpointed.model.get_base_model().is_activation_checkpointing
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain_result.losses), rtol=1e-5, atol=1e-6)
    kept, full = saved_activation_bytes(checkpointed), saved_activation_bytes(plain)
    assert kept < 0.7 * full, (kept, full)


@pytest.mark.parametrize(("quantization", "layer_type"), [("bnb-nf4", "Linear4bit"), ("bnb-int8", "Linear8bitLt")])
def test_qlora_trains_lora_in_float32_over_a_frozen_quantized_base(
    settings, dataset, tmp_path, quantization, layer_type
):
    spec = spec_for(dataset, tmp_path, max_steps=8, quantization=quantization, gradient_checkpointing=True)
    recipe, result = trained_recipe(settings, spec)
    base = recipe.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == layer_type and not q_proj.weight.requires_grad
    trainable = [p for p in recipe.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert result.losses[-1] < result.losses[0] * 0.8, result.losses


def test_a_qlora_adapter_serves_on_the_base_loaded_quantized_or_not(settings, dataset, tmp_path):
    """The NF4-trained adapter on an NF4 base gives what the trained model gives; on the full-precision base
    it gives what peft gives there (how far apart the two are is measured on SmolLM2: docs/quantization.md)."""
    spec = spec_for(dataset, tmp_path / "job", max_steps=6, quantization="bnb-nf4")
    recipe, _ = trained_recipe(settings, spec)
    recipe.save(tmp_path / "adapter")
    prompt = torch.tensor([[1, 286, 80, 340, 1237]])
    recipe.model.eval()
    with torch.inference_mode():
        trained = recipe.model(prompt).logits
        full_peft = PeftModel.from_pretrained(load_causal_lm(settings.models[0], settings).model, tmp_path / "adapter")
        on_full_by_peft = full_peft.eval()(prompt).logits
    served = {}
    for model_entry in (entry("bnb-nf4"), settings.models[0]):
        model = load_causal_lm(model_entry, settings).model
        lora = MultiLora(model, slots=1)
        lora.load(0, tmp_path / "adapter")
        lora.set_rows([0])
        with torch.inference_mode():
            served[model_entry.quantization] = model(prompt).logits
    torch.testing.assert_close(served["bnb-nf4"], trained, atol=1e-4, rtol=0)
    torch.testing.assert_close(served["none"], on_full_by_peft, atol=1e-4, rtol=0)


def test_the_8bit_optimizer_trains_with_8bit_state(settings, dataset, tmp_path):
    """Rank 64 makes the tiny model's lora_A 64 x 64: bitsandbytes keeps tensors of 4096 elements and more
    in 8 bits (smaller ones in 32)."""
    spec = spec_for(dataset, tmp_path, max_steps=6, optimizer="adamw_8bit", lora_r=64)
    recipe, result = trained_recipe(settings, spec)
    assert result.losses[-1] < result.losses[0]
    big = [s for p, s in recipe.trainer.optimizer.state.items() if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in big)


def test_the_paged_optimizer_is_refused_on_a_cpu_worker(settings, dataset, tmp_path):
    spec = spec_for(dataset, tmp_path, max_steps=2, optimizer="paged_adamw_8bit")
    with pytest.raises(TrainingInputError, match=r"paged_adamw_8bit pages its state.*use adamw_8bit"):
        train_here(spec, settings, None, None, CPU)


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"quantization": "fp8"}, "quantization 'fp8' cannot train; use one of none, bnb-nf4, bnb-int8"),
        ({"quantization": "nf4"}, "quantization 'nf4' cannot train"),
        ({"optimizer": "sgd"}, "optimizer must be one of adamw, adamw_8bit, paged_adamw_8bit"),
    ],
)
def test_memory_choices_are_checked_when_the_job_is_created(hyperparameters, message):
    data = spec_data()
    with pytest.raises(InvalidArgument, match=message):
        resolve(Hyperparameters(**hyperparameters), data)


def test_paged_optimizers_and_diffusion_quantization_are_refused_up_front():
    with pytest.raises(InvalidArgument, match="every worker here runs on the CPU; use adamw_8bit"):
        resolve(Hyperparameters(optimizer="paged_adamw_8bit"), replace(spec_data(), cuda_workers=False))
    with pytest.raises(InvalidArgument, match="quantization applies to LLM jobs"):
        resolve(Hyperparameters(quantization="bnb-nf4"), replace(spec_data(), kind="diffusion", native_resolution=64))


def spec_data():
    from services.finetune.hyperparams import LLM_TARGETS, TrainingData

    return TrainingData(
        kind="llm", num_records=40, architecture="llama", record_type="prompt_completion", targets=LLM_TARGETS["llama"]
    )
