"""A LoRA adapter on the real default model (SmolLM2-135M-Instruct) exported as a Q8_0 GGUF, read back through
a `gguf:` source (the loader the LLM service uses), against base + adapter on the full-precision server."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.llm.v1 import llm_pb2
from shared.adapters import AdapterInfo, AdapterStore
from shared.loaders import load_causal_lm, prepare
from shared.settings import Settings

pytestmark = pytest.mark.timeout(900)  # its setup merges SmolLM2, writes a GGUF and converts it back

ADAPTER = "smollm2-export"
QUESTIONS = ["What is the capital of France?", "Name three colours."]


@pytest.fixture(scope="module")
def adapter(data_dir, smollm2) -> str:
    """A small random LoRA on every attention projection: it changes the text, the model stays sensible."""
    settings = Settings.model_validate({"data_dir": data_dir, "models": [smollm2]})
    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(7)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    info = AdapterInfo(name=ADAPTER, kind="llm", base_model=smollm2["name"])
    AdapterStore(settings.adapters_dir).save(info, peft_model.save_pretrained)
    return ADAPTER


@pytest.fixture(scope="module")
def q8_model(finetune_stub, adapter, data_dir):
    """The Q8_0 export, read back through a `gguf:` source by the loader the LLM service uses."""
    export = finetune_stub.ExportAdapter(
        pb.ExportAdapterRequest(adapter=adapter, format=pb.EXPORT_FORMAT_GGUF, gguf_type="Q8_0")
    )
    settings = Settings.model_validate({"data_dir": data_dir, "models": []})
    path = settings.exports_dir / export.name / f"{export.name}.gguf"
    entry = {"name": "smollm2-q8", "kind": "llm", "source": f"gguf:{path}", "dtype": "float32"}
    settings = Settings.model_validate({"data_dir": data_dir, "models": [entry]})
    prepare(settings.models[0], settings)
    return load_causal_lm(settings.models[0], settings)


def served_tokens(stub, question: str, adapter: str) -> list[int]:
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content=question)],
        adapter=adapter,
        sampling=llm_pb2.SamplingParams(max_new_tokens=24, logprobs=True),
    )
    return [t.id for t in stub.Generate(request).logprobs]


def exported_tokens(loaded, question: str, n: int) -> tuple[list[int], str]:
    """Greedy tokens of the exported model on the chat template it carries."""
    tokenizer = loaded.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    new = out[0, len(ids) :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_a_q8_export_of_smollm2_agrees_with_base_plus_adapter_on_most_tokens(q8_model, real_llm, adapter):
    agreeing, total = 0, 0
    for question in QUESTIONS:
        expected = served_tokens(real_llm, question, adapter)
        got, text = exported_tokens(q8_model, question, len(expected))
        same = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), len(expected))
        agreeing, total = agreeing + same, total + len(expected)
        if question.startswith("What is the capital"):
            assert "Paris" in text, text
    print(f"Q8_0 GGUF against base + adapter: {agreeing} of {total} leading greedy tokens agree")
    assert agreeing >= total // 2
