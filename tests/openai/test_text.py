"""Chat and text completions, embeddings and the model list through the official `openai` SDK."""

from __future__ import annotations

import asyncio
import base64
import json

import jsonschema
import numpy as np
import openai
import pytest

from modelworks.llm.v1 import llm_pb2
from tests.conftest import HELD_TOKENS
from tests.gateway.conftest import running_requests
from tests.harness import wait_for
from tests.openai.conftest import async_sdk_client

SMOLLM2 = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ZURICH = [
    {"role": "system", "content": "You are a friendly guide."},
    {"role": "user", "content": [{"type": "text", "text": "Say something nice about Zürich in two sentences."}]},
]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}


def test_chat_answers_a_factual_question(real_client):
    reply = real_client.chat.completions.create(model=SMOLLM2, messages=FRANCE, temperature=0, max_tokens=24)
    (choice,) = reply.choices
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == SMOLLM2
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == (
        reply.usage.prompt_tokens + reply.usage.completion_tokens
    )


def test_a_stream_gives_the_unary_text_for_the_same_seed_sync_and_async(real_client, real_api):
    sampled = dict(model=SMOLLM2, messages=ZURICH, temperature=0.9, seed=1234, max_tokens=40)
    unary = real_client.chat.completions.create(**sampled).choices[0].message.content
    chunks = list(real_client.chat.completions.create(**sampled, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unary and len(unary) > 20
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    async def streamed_async() -> str:
        client = async_sdk_client(real_api)
        stream = await client.chat.completions.create(**sampled, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(streamed_async()) == unary


def test_n_gives_that_many_choices(client):
    reply = client.chat.completions.create(model="tiny-llm", messages=FRANCE, n=3, seed=5, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1, "seeded choices differ"
    assert 3 <= reply.usage.completion_tokens <= 3 * 8
    streamed = client.chat.completions.create(model="tiny-llm", messages=FRANCE, n=3, seed=5, max_tokens=8, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, llm_server):
    before = running_requests(llm_server)
    stream = client.chat.completions.create(
        model="tiny-llm", messages=FRANCE, max_tokens=HELD_TOKENS, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    wait_for(lambda: running_requests(llm_server) == before + 1, 60, "the stream to hold a slot")
    stream.close()
    wait_for(lambda: running_requests(llm_server) == before, 60, "the slot to be freed")


def test_json_schema_output_validates(real_client):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    reply = real_client.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
        temperature=0,
        max_tokens=40,
    )
    answer = json.loads(reply.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]


def test_a_required_tool_call_comes_back_parsed_with_arguments_that_validate(real_client):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}
    reply = real_client.chat.completions.create(
        model=SMOLLM2,
        messages=[{"role": "user", "content": "What is the weather like in Paris right now?"}],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    answered = real_client.chat.completions.create(
        model=SMOLLM2,
        messages=[
            {"role": "user", "content": "What is the weather like in Paris right now?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'},
        ],
        tools=[tool],
        temperature=0,
        max_tokens=40,
    )
    assert answered.choices[0].message.content or answered.choices[0].message.tool_calls


def test_a_streamed_tool_call_arrives_whole_in_one_indexed_delta(real_client):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
    chunks = list(
        real_client.chat.completions.create(
            model=SMOLLM2,
            messages=[{"role": "user", "content": "What is the weather like in Paris right now?"}],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
            max_tokens=80,
            stream=True,
        )
    )
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    (call,) = deltas
    assert call.index == 0 and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_logprobs_come_back_per_token(client):
    reply = client.chat.completions.create(
        model="tiny-llm", messages=FRANCE, max_tokens=5, logprobs=True, top_logprobs=3, temperature=0
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 5
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5, "greedy picks the likeliest"


def test_a_fine_tuned_model_id_is_its_adapter(client, llm_stub):
    reply = client.chat.completions.create(model="lora-a", messages=FRANCE, temperature=0, max_tokens=8)
    direct = llm_stub.Generate(
        llm_pb2.GenerateRequest(
            adapter="lora-a",
            messages=[llm_pb2.ChatMessage(role="user", content=FRANCE[0]["content"])],
            sampling=llm_pb2.SamplingParams(max_new_tokens=8),
        )
    )
    assert reply.choices[0].message.content == direct.text


def test_text_completions_take_a_list_of_prompts_and_echo(client):
    reply = client.completions.create(
        model="tiny-llm", prompt=["Once upon a time", "The answer is"], max_tokens=6, temperature=0, echo=True
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text.startswith("Once upon a time") and reply.choices[1].text.startswith("The answer is")
    scored = client.completions.create(model="tiny-llm", prompt="Once upon a time", max_tokens=4, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    streamed = client.completions.create(
        model="tiny-llm", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "Once upon a time" + "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny-llm", prompt="def f(", suffix="return 1")


def test_the_model_list_shows_base_models_and_adapters(client):
    cards = {m.id: m for m in client.models.list()}
    assert {"tiny-llm", "tiny-embed", "tiny-sd", "lora-a", "lora-b"} <= set(cards)
    assert cards["lora-a"].model_extra["parent"] == "tiny-llm"
    assert cards["tiny-embed"].model_extra["kind"] == "embedding"
    assert client.models.retrieve("lora-b").id == "lora-b"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-17")


def test_embeddings_have_the_right_shape_in_floats_and_base64(client):
    texts = ["a lighthouse", "the sea", "a lighthouse"]
    floats = client.embeddings.create(model="tiny-embed", input=texts)
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape[0] == 3 and vectors.shape[1] > 8 and floats.usage.prompt_tokens > 0
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    packed = client.embeddings.create(model="tiny-embed", input=texts, encoding_format="base64")
    raw = packed.data[1].embedding
    unpacked = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    np.testing.assert_allclose(unpacked, vectors[1], atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="matryoshka"):  # not trained to be truncated
        client.embeddings.create(model="tiny-embed", input="the sea", dimensions=8)
