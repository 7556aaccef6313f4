"""The real default chat model (SmolLM2-135M-Instruct) served with its linear layers in NF4 and in int8,
next to the full-precision server of `test_real_model`: smaller weights, still sensible answers."""

from __future__ import annotations

import grpc
import pytest

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from tests.conftest import TEST_SERVER_CONFIG
from tests.harness import spawn_service

pytestmark = pytest.mark.timeout(900)  # its setup converts SmolLM2 and loads it twice, quantized


@pytest.fixture(scope="module")
def quantized(data_dir, smollm2, tmp_path_factory):
    models = [{**smollm2, "name": f"smollm2-{q}", "quantization": q} for q in ("bnb-nf4", "bnb-int8")]
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "models": models}
    server = spawn_service("llm", tmp_path_factory.mktemp("quantized-llm"), config, timeout=180)
    with grpc.insecure_channel(server.address) as channel:
        yield llm_pb2_grpc.LLMServiceStub(channel)
    server.stop()


def model_infos(stub) -> dict[str, llm_pb2.ModelInfo]:
    return {m.name: m for m in stub.ListModels(llm_pb2.ListModelsRequest()).models}


def test_list_models_reports_the_quantization_and_fewer_weight_bytes(quantized, real_llm):
    (full,) = model_infos(real_llm).values()
    infos = model_infos(quantized)
    assert (full.quantization, infos["smollm2-bnb-nf4"].quantization) == ("none", "bnb-nf4")
    assert infos["smollm2-bnb-int8"].quantization == "bnb-int8"
    # SmolLM2's tied 49k x 576 embedding stays full precision: about a third of its float32 weights
    assert infos["smollm2-bnb-int8"].weight_bytes < 0.6 * full.weight_bytes
    assert infos["smollm2-bnb-nf4"].weight_bytes < infos["smollm2-bnb-int8"].weight_bytes
    assert all(info.dtype == "float32" for info in infos.values()), "they compute in the entry's dtype"


@pytest.mark.parametrize("model", ["smollm2-bnb-nf4", "smollm2-bnb-int8"])
def test_a_quantized_smollm2_still_answers_a_factual_question(quantized, model):
    request = llm_pb2.GenerateRequest(
        model=model,
        messages=[llm_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        sampling=llm_pb2.SamplingParams(max_new_tokens=32),
    )
    reply = quantized.Generate(request)
    assert "Paris" in reply.text, reply.text


def test_a_quantized_smollm2_streams_the_unary_text(quantized):
    request = llm_pb2.GenerateRequest(
        model="smollm2-bnb-nf4",
        messages=[llm_pb2.ChatMessage(role="user", content="Name three colours.")],
        sampling=llm_pb2.SamplingParams(max_new_tokens=24),
    )
    unary = quantized.Generate(request)
    assert "".join(c.text for c in quantized.GenerateStream(request)) == unary.text and unary.text
