"""Tool calling: each format's parser on canned outputs, the streaming splitter, and calls through the service."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from modelworks.llm.v1 import llm_pb2
from services.llm.tool_formats import HERMES, LLAMA3, MISTRAL, detect
from services.llm.tools import ToolCallStream, parse_tools
from shared.errors import InvalidArgument

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    llm_pb2.Tool(name="get_weather", description="Weather for a city", parameters=json.dumps(WEATHER)),
    llm_pb2.Tool(name="get_time", description="The time now", parameters=""),
]

CANNED = {
    "hermes": (
        HERMES,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", '
        '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
    ),
    "llama3": (
        LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius", "days": 2}}; '
        '{"name": "get_time", "parameters": {}}',
        "",
    ),
    "mistral": (
        MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", "days": 2}}, '
        '{"name": "get_time", "arguments": {}}]',
        "",
    ),
}


def split(fmt, text: str, piece: int) -> tuple[str, list]:
    """Feed `text` in pieces of `piece` characters, as a stream would; (plain text, calls)."""
    stream = ToolCallStream(fmt)
    plain, calls = [], []
    for start in range(0, len(text), piece):
        released, done = stream.feed(text[start : start + piece])
        plain.append(released)
        calls.extend(done)
    plain.append(stream.flush())
    return "".join(plain), calls


@pytest.mark.parametrize("name", list(CANNED))
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_each_format_reads_its_calls_from_canned_output_however_it_is_streamed(name, piece):
    fmt, text, plain = CANNED[name]
    got_plain, calls = split(fmt, text, piece)
    assert got_plain == plain
    expected = [("get_weather", {"city": "Oslo", "unit": "celsius", "days": 2}), ("get_time", {})]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


def test_text_without_calls_passes_through_and_a_call_cut_short_comes_back_as_text():
    assert split(HERMES, "Plain answer, no <tool call here>.", 2) == ("Plain answer, no <tool call here>.", [])
    cut = '<tool_call>\n{"name": "get_weather", "argum'
    assert split(HERMES, "Hi " + cut, 4) == ("Hi " + cut, [])


def test_the_format_is_detected_from_the_chat_template():
    assert detect("{{ '[TOOL_CALLS]' }}") is MISTRAL
    assert detect("{% if message.role == 'ipython' %}<|python_tag|>{% endif %}") is LLAMA3
    assert detect("{{ '<tool_call>' }}") is HERMES
    assert detect(None) is HERMES


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([("bad name!", "", "")], "must be 1-64 letters"),
        ([("f", "", ""), ("f", "", "")], "given twice"),
        ([("f", "", "{nope")], r"tools\[0\].parameters \(f\) is not valid JSON"),
        ([("f", "", "[1]")], "must be a JSON schema object"),
        ([(f"f{i}", "", "") for i in range(129)], "at most 128 tools"),
    ],
)
def test_bad_tools_are_refused_naming_the_tool(tools, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_tools(tools)


def chat(tools=TOOLS, parallel_tool_calls=True, **choice) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        parallel_tool_calls=parallel_tool_calls,
        messages=[llm_pb2.ChatMessage(role="user", content="What is the weather in Oslo?")],
        tools=tools,
        tool_choice=llm_pb2.ToolChoice(**choice),
        sampling=llm_pb2.SamplingParams(max_new_tokens=300, temperature=1.0, seed=3),
    )


def test_required_gives_a_call_whose_arguments_validate_even_on_a_random_model(llm_stub):
    for seed in range(5):
        request = chat(mode=llm_pb2.ToolChoice.REQUIRED)
        request.sampling.seed = seed
        response = llm_stub.Generate(request)
        assert response.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS, response
        assert response.tool_calls and response.text == ""
        for call in response.tool_calls:
            arguments = json.loads(call.arguments)
            jsonschema.validate(arguments, WEATHER if call.name == "get_weather" else {"type": "object"})
    single = chat(mode=llm_pb2.ToolChoice.REQUIRED, parallel_tool_calls=False)
    for seed in range(3):
        single.sampling.seed = seed
        assert len(llm_stub.Generate(single).tool_calls) == 1


def test_a_named_function_is_the_one_called_and_streaming_sends_it_once_complete(llm_stub):
    request = chat(function="get_weather")
    unary = llm_stub.Generate(request)
    assert [c.name for c in unary.tool_calls] == ["get_weather"]
    jsonschema.validate(json.loads(unary.tool_calls[0].arguments), WEATHER)
    chunks = list(llm_stub.GenerateStream(request))
    streamed = [c for chunk in chunks for c in chunk.tool_calls]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in unary.tool_calls]
    assert chunks[-1].finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS


def test_none_hides_the_tools_and_a_tool_result_can_be_sent_back(llm_stub):
    plain = llm_stub.Generate(chat(mode=llm_pb2.ToolChoice.NONE))
    assert not plain.tool_calls and plain.finish_reason != llm_pb2.FINISH_REASON_TOOL_CALLS
    call = llm_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
    follow_up = llm_pb2.GenerateRequest(
        messages=[
            llm_pb2.ChatMessage(role="user", content="Weather in Oslo?"),
            llm_pb2.ChatMessage(role="assistant", tool_calls=[call]),
            llm_pb2.ChatMessage(role="tool", tool_call_id="call_1", content='{"temp": 21}'),
        ],
        tools=TOOLS,
        sampling=llm_pb2.SamplingParams(max_new_tokens=8),
    )
    assert llm_stub.Generate(follow_up).usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (chat(function="nope"), "names function 'nope', which is not among the tools"),
        (chat(tools=[], mode=llm_pb2.ToolChoice.REQUIRED), "REQUIRED needs at least one tool"),
        (chat(mode=99), "tool_choice must be one of"),
        (llm_pb2.GenerateRequest(prompt="x", tools=TOOLS), "tools need messages"),
        (
            llm_pb2.GenerateRequest(
                messages=[llm_pb2.ChatMessage(role="user", content="x")],
                tools=TOOLS,
                response_format=llm_pb2.ResponseFormat(json_object=True),
            ),
            "either tools or a response_format",
        ),
        (
            llm_pb2.GenerateRequest(
                messages=[
                    llm_pb2.ChatMessage(role="assistant", tool_calls=[llm_pb2.ToolCall(name="f", arguments="{x")])
                ]
            ),
            "arguments are not JSON",
        ),
    ],
)
def test_bad_tool_requests_get_invalid_argument(llm_stub, request_, message):
    with pytest.raises(grpc.RpcError) as caught:
        llm_stub.Generate(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_text_after_a_call_keeps_its_spaces():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<b>done</b> and more words'
    for piece in (1, 2, 5):
        plain, calls = split(HERMES, text, piece)
        assert plain == "<b>done</b> and more words" and [c.name for c in calls] == ["f"]


@pytest.fixture(scope="module")
def engine_and_compiler(tiny_llm, settings):
    from services.llm.grammar import GrammarCompiler
    from tests.llm.engine_helpers import make_engine

    vocab = tiny_llm.model.get_output_embeddings().weight.shape[0]
    compiler = GrammarCompiler(tiny_llm.tokenizer, vocab, cache_size=16, max_compile_s=30, max_chars=1 << 16)
    engine = make_engine(tiny_llm, settings, max_batch_size=32)
    engine.start()
    yield engine, compiler
    engine.shutdown()
    compiler.shutdown()


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL], ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["required", "function", "auto"])
def test_every_formats_grammar_yields_calls_its_parser_reads(tiny_llm, engine_and_compiler, fmt, mode):
    """Generation under each format's structural tag, on the random model, parses back into valid calls."""
    from services.llm.engine import FinishReason, Sequence
    from services.llm.params import SamplingConfig
    from services.llm.tools import ToolChoice, tool_grammar
    from tests.llm.engine_helpers import Collector, encode

    engine, compiler = engine_and_compiler
    tools = parse_tools([(t.name, t.description, t.parameters) for t in TOOLS])
    # one call each: a random model may go on adding parallel calls until max_new_tokens
    choice = ToolChoice(mode, "get_weather" if mode == "function" else "", parallel=False)
    grammar = compiler.compile(tool_grammar(fmt, tools, choice))
    collectors = []
    for seed in range(6):
        collectors.append(Collector())
        config = SamplingConfig(max_new_tokens=400, temperature=1.0, seed=seed)
        engine.submit(Sequence(encode(tiny_llm, "x ="), config, collectors[-1], grammar=grammar))
    for collector in collectors:
        text, final = collector.wait(120)
        plain, calls = split(fmt, text, 7)
        if mode != "auto":
            assert final.finish_reason is FinishReason.EOS and calls and not plain.strip(), text
        if mode == "function":
            assert [c.name for c in calls] == ["get_weather"]
        for call in calls:
            schema = WEATHER if call.name == "get_weather" else {"type": "object"}
            jsonschema.validate(json.loads(call.arguments), schema)
