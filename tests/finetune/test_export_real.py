"""A LoRA adapter on the real default model (SmolLM2-135M-Instruct) exported as a Q8_0 GGUF, served back
through `gguf:`, against base + adapter on the full-precision server."""

from __future__ import annotations

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from shared.adapters import AdapterInfo, AdapterStore
from shared.loaders import load_causal_lm, prepare
from shared.settings import Settings
from tests.conftest import TEST_SERVER_CONFIG
from tests.harness import spawn_service

pytestmark = pytest.mark.timeout(900)  # its setup merges SmolLM2, writes and converts a GGUF and starts a server

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
def q8_server(finetune_stub, adapter, data_dir, tmp_path_factory):
    export = finetune_stub.ExportAdapter(
        pb.ExportAdapterRequest(adapter=adapter, format=pb.EXPORT_FORMAT_GGUF, gguf_type="Q8_0")
    )
    settings = Settings.model_validate({"data_dir": data_dir, "models": []})
    path = settings.exports_dir / export.name / f"{export.name}.gguf"
    entry = {"name": "smollm2-q8", "kind": "llm", "source": f"gguf:{path}", "dtype": "float32"}
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "models": [entry]}
    prepare(Settings.model_validate(config).models[0], Settings.model_validate(config))
    server = spawn_service("llm", tmp_path_factory.mktemp("llm-q8"), config, timeout=180)
    with grpc.insecure_channel(server.address) as channel:
        yield llm_pb2_grpc.LLMServiceStub(channel)
    server.stop()


def tokens(stub, question: str, adapter: str = "") -> tuple[list[int], str]:
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content=question)],
        adapter=adapter,
        sampling=llm_pb2.SamplingParams(max_new_tokens=24, logprobs=True),
    )
    reply = stub.Generate(request)
    return [t.id for t in reply.logprobs], reply.text


def test_a_q8_export_of_smollm2_agrees_with_base_plus_adapter_on_most_tokens(q8_server, real_llm, adapter):
    agreeing, total = 0, 0
    for question in QUESTIONS:
        expected, _ = tokens(real_llm, question, adapter)
        got, text = tokens(q8_server, question)
        same = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), len(expected))
        agreeing, total = agreeing + same, total + len(expected)
        if question.startswith("What is the capital"):
            assert "Paris" in text, text
    print(f"Q8_0 GGUF against base + adapter: {agreeing} of {total} leading greedy tokens agree")
    assert agreeing >= total // 2
