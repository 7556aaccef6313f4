"""The LLM service through a real gRPC channel to a real server process."""

from __future__ import annotations

import json
import re
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from modelworks.llm.v1 import llm_pb2
from shared.builtin import builtin_dir
from tests.conftest import HELD_TOKENS
from tests.scrape import metric_value

SP = llm_pb2.SamplingParams


def request(prompt="def main():", **sampling):
    return llm_pb2.GenerateRequest(prompt=prompt, sampling=SP(**({"max_new_tokens": 16} | sampling)))


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return AutoTokenizer.from_pretrained(builtin_dir("tiny-llm", data_dir / "models"))


def test_health_is_serving(llm_channel):
    stub = health_pb2_grpc.HealthStub(llm_channel)
    for service in ("", "modelworks.llm.v1.LLMService"):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        )


def test_list_models(llm_stub):
    model, embedder = llm_stub.ListModels(llm_pb2.ListModelsRequest()).models
    assert (model.name, model.kind, model.is_default, model.device) == ("tiny-llm", "llm", True, "cpu")
    assert model.max_context_length == 131072
    assert model.max_new_tokens_limit == 131072  # the session server's llm.max_new_tokens_limit (tests/conftest.py)
    assert (model.dtype, model.dtype_reason) == ("float32", "set in the model entry")
    assert (embedder.dtype, embedder.dtype_reason) == ("float32", "set in the model entry")
    assert (embedder.name, embedder.kind, embedder.is_default, embedder.max_context_length) == (
        "tiny-embed",
        "embedding",
        True,
        512,
    )


def test_generate_and_stream_give_the_same_text(llm_stub):
    for sampling in ({}, {"temperature": 0.8, "seed": 3, "top_k": 40}):
        unary = llm_stub.Generate(request(**sampling, ignore_eos=True))
        chunks = list(llm_stub.GenerateStream(request(**sampling, ignore_eos=True)))
        assert "".join(c.text for c in chunks) == unary.text
        assert unary.finish_reason == chunks[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
        assert unary.usage == chunks[-1].usage
        assert unary.usage.completion_tokens == 16
        assert all(not c.HasField("usage") for c in chunks[:-1])
        assert len(chunks) > 2, "text arrives token by token"


def test_seeds_reproduce_and_are_reported(llm_stub):
    first = llm_stub.Generate(request(temperature=1.0, max_new_tokens=24))
    again = llm_stub.Generate(request(temperature=1.0, max_new_tokens=24, seed=first.seed))
    assert again.text == first.text and again.seed == first.seed


def test_prompt_usage_counts_the_bos_once(llm_stub, tokenizer):
    prompt = "hello"
    response = llm_stub.Generate(request(prompt, max_new_tokens=1))
    assert response.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    ids = llm_stub.Tokenize(llm_pb2.TokenizeRequest(text=prompt)).ids
    assert list(ids) == tokenizer(prompt)["input_ids"] and ids[0] == tokenizer.bos_token_id


def test_chat_messages_use_the_chat_template_without_a_doubled_bos(llm_stub, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert expected.count(tokenizer.bos_token_id) == 1
    response = llm_stub.Generate(
        llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(**m) for m in messages], sampling=SP(max_new_tokens=4))
    )
    assert response.usage.prompt_tokens == len(expected)


def test_stop_strings_are_never_emitted_even_in_part(llm_stub):
    full = llm_stub.Generate(request(max_new_tokens=40, ignore_eos=True)).text
    stop = full[20:24]
    chunks = list(llm_stub.GenerateStream(request(max_new_tokens=40, ignore_eos=True, stop=[stop])))
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == llm_pb2.FINISH_REASON_STOP


def test_an_adapter_is_served_by_name(llm_stub, adapters):
    base = llm_stub.Generate(request(ignore_eos=True)).text
    tuned = llm_stub.Generate(
        llm_pb2.GenerateRequest(
            prompt="def main():", adapter=adapters[0], sampling=SP(max_new_tokens=16, ignore_eos=True)
        )
    )
    assert tuned.text != base
    assert llm_stub.Generate(request(ignore_eos=True)).text == base, "the base model is unchanged"


def test_a_new_adapter_is_servable_without_restart(llm_stub, settings):
    from tests.conftest import make_lora_adapter

    make_lora_adapter(settings, "fresh-one", seed=999)
    response = llm_stub.Generate(
        llm_pb2.GenerateRequest(prompt="x", adapter="fresh-one", sampling=SP(max_new_tokens=4))
    )
    assert response.usage.completion_tokens >= 1


BAD_REQUESTS = {
    "neither prompt nor messages": (llm_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    "both prompt and messages": (
        llm_pb2.GenerateRequest(prompt="x", messages=[llm_pb2.ChatMessage(role="user", content="y")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one",
    ),
    "negative temperature": (request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0"),
    "top_p zero": (request(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, r"top_p must be in \(0, 1\]"),
    "top_p above one": (request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "repetition penalty zero": (
        request(repetition_penalty=0.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "repetition_penalty",
    ),
    "repetition penalty negative": (request(repetition_penalty=-1), grpc.StatusCode.INVALID_ARGUMENT, "> 0"),
    "repetition penalty vanishing": (
        request(repetition_penalty=1e-30),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"in \[0.01, 100\]",
    ),
    "max_new_tokens over the limit": (
        request(max_new_tokens=200_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit is 131072",
    ),
    "max_new_tokens past the context": (request(max_new_tokens=131071), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    "prompt longer than the context": (
        request("word " * 140_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "context is 131072",
    ),
    "prompt over the prefill budget": (
        request("word " * 9000),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"prompts of at most 8192 tokens \(llm.max_prompt_tokens\)",
    ),
    "prompt over the character limit": (
        request("x" * 1_000_001),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"1000001 characters; the limit is 1000000 \(llm.max_prompt_chars\)",
    ),
    "conversation over the character limit": (
        llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content="x" * 1_000_001)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the limit is 1000000",
    ),
    "malformed adapter name": (
        llm_pb2.GenerateRequest(prompt="x", adapter="../../etc/passwd"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "adapter name",
    ),
    "unknown adapter": (
        llm_pb2.GenerateRequest(prompt="x", adapter="no-such-adapter"),
        grpc.StatusCode.NOT_FOUND,
        "not found",
    ),
    "unknown model": (
        llm_pb2.GenerateRequest(prompt="x", model="gpt-9"),
        grpc.StatusCode.NOT_FOUND,
        "served llm models: tiny-llm",
    ),
    "presence penalty out of range": (
        request(presence_penalty=2.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"presence_penalty must be in \[-2, 2\]",
    ),
    "frequency penalty not finite": (
        request(frequency_penalty=float("nan")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "frequency_penalty must be a finite number",
    ),
    "min_p above one": (request(min_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, r"min_p must be in \[0, 1\]"),
    "logit bias out of range": (
        request(logit_bias={5: 150.0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"logit_bias\[5\] must be in \[-100, 100\]",
    ),
    "logit bias past the vocabulary": (
        request(logit_bias={99999: 1.0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "names token 99999; this model's token ids are 0-",
    ),
    "stop token past the vocabulary": (
        request(stop_token_ids=[2**31]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop_token_ids names token",
    ),
    "too many top logprobs": (
        request(top_logprobs=21),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"top_logprobs must be in \[0, 20\]",
    ),
    "min_new_tokens over max_new_tokens": (
        request(min_new_tokens=20, max_new_tokens=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"min_new_tokens \(20\) must not exceed max_new_tokens \(10\)",
    ),
    "schema that is not JSON": (
        llm_pb2.GenerateRequest(prompt="x", response_format=llm_pb2.ResponseFormat(json_schema="{oops")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "json_schema is not valid JSON",
    ),
    "unsupported regex": (
        llm_pb2.GenerateRequest(prompt="x", response_format=llm_pb2.ResponseFormat(regex="(a")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "regex cannot be used",
    ),
    "grammar with an undefined rule": (
        llm_pb2.GenerateRequest(prompt="x", response_format=llm_pb2.ResponseFormat(grammar="root ::= nothing")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "grammar cannot be used",
    ),
    "min_new_tokens with a format": (
        llm_pb2.GenerateRequest(
            prompt="x",
            response_format=llm_pb2.ResponseFormat(json_object=True),
            sampling=SP(max_new_tokens=8, min_new_tokens=2),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_new_tokens cannot be combined with a response_format",
    ),
    "empty chat role": (
        llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(content="hi")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_input_gets_a_clear_status_and_the_server_stays_healthy(llm_stub, llm_channel, case, method):
    bad, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        result = getattr(llm_stub, method)(bad)
        list(result) if method == "GenerateStream" else result
    assert caught.value.code() == code
    assert re.search(message, caught.value.details()), caught.value.details()
    assert "Traceback" not in caught.value.details()
    assert llm_stub.Generate(request(max_new_tokens=2)).usage.completion_tokens >= 1
    health = health_pb2_grpc.HealthStub(llm_channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tokenize_unknown_model_is_not_found(llm_stub):
    with pytest.raises(grpc.RpcError) as caught:
        llm_stub.Tokenize(llm_pb2.TokenizeRequest(model="nope", text="x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_tokenize_refuses_a_huge_text_before_tokenizing(llm_stub):
    with pytest.raises(grpc.RpcError) as caught:
        llm_stub.Tokenize(llm_pb2.TokenizeRequest(text="x" * 1_000_001))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "llm.max_prompt_chars" in caught.value.details()


def running(server) -> float:
    return metric_value(server, "modelworks_llm_num_requests_running", model="tiny-llm")


def wait_until_idle(server, timeout=60):
    from tests.harness import wait_for

    wait_for(lambda: running(server) == 0, timeout, "the running batch to empty")


def test_a_passed_deadline_gives_deadline_exceeded_and_frees_the_slot(llm_stub, llm_server):
    with pytest.raises(grpc.RpcError) as caught:
        llm_stub.Generate(request(max_new_tokens=HELD_TOKENS, ignore_eos=True), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(llm_server)


def test_a_cancelled_stream_frees_its_slot(llm_stub, llm_server):
    stream = llm_stub.GenerateStream(request(max_new_tokens=HELD_TOKENS, ignore_eos=True))
    next(stream)
    assert running(llm_server) >= 1  # minutes of generation left: it runs until cancelled
    stream.cancel()
    wait_until_idle(llm_server)


def test_concurrent_streams_are_batched_and_each_matches_its_solo_run(llm_stub, llm_server):
    prompts = [f"def f{i}(x):" for i in range(8)]
    solo = [llm_stub.Generate(request(p, max_new_tokens=24, ignore_eos=True)).text for p in prompts]
    results = [None] * len(prompts)

    def call(i):
        results[i] = "".join(
            c.text for c in llm_stub.GenerateStream(request(prompts[i], max_new_tokens=24, ignore_eos=True))
        )

    def steps() -> tuple[float, float]:  # (decode steps of one sequence, all decode steps), cumulative
        return (
            metric_value(llm_server, "modelworks_llm_batch_size_bucket", model="tiny-llm", le="1.0"),
            metric_value(llm_server, "modelworks_llm_batch_size_count", model="tiny-llm"),
        )

    singles_before, total_before = steps()
    holder = llm_stub.GenerateStream(request("held", max_new_tokens=HELD_TOKENS, ignore_eos=True))
    next(holder)  # runs throughout: every decode step from here on carries it and the others
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    singles, total = steps()
    holder.cancel()
    assert results == solo
    assert total - total_before > singles - singles_before, "decode steps ran more than one sequence"


def test_metrics_are_exported(llm_stub, llm_server):
    counters = (
        "modelworks_llm_time_to_first_token_seconds_count",
        "modelworks_llm_e2e_request_latency_seconds_count",
        "modelworks_llm_prompt_tokens_total",
        "modelworks_llm_generation_tokens_total",
        "modelworks_llm_inter_token_latency_seconds_count",
    )
    before = {name: metric_value(llm_server, name, model="tiny-llm") for name in counters}
    ok_before = metric_value(llm_server, "modelworks_grpc_requests_total", method="Generate", code="OK")
    llm_stub.Generate(request(max_new_tokens=3, ignore_eos=True))
    for name in counters:
        assert metric_value(llm_server, name, model="tiny-llm") > before[name], name
    assert metric_value(llm_server, "modelworks_grpc_requests_total", method="Generate", code="OK") == ok_before + 1
    with pytest.raises(grpc.RpcError):
        llm_stub.Tokenize(llm_pb2.TokenizeRequest(model="unknown-model"))
    assert metric_value(llm_server, "modelworks_grpc_requests_total", method="Tokenize", code="NOT_FOUND") >= 1


def test_a_replaced_adapter_is_served_fresh_and_a_deleted_one_is_not_served(llm_stub, settings):
    from shared.adapters import AdapterStore
    from tests.conftest import make_lora_adapter

    def generate(adapter):
        return llm_stub.Generate(
            llm_pb2.GenerateRequest(
                prompt="def main():", adapter=adapter, sampling=SP(max_new_tokens=16, ignore_eos=True)
            )
        ).text

    make_lora_adapter(settings, "swap", seed=301)
    make_lora_adapter(settings, "swap-reference", seed=302)
    first = generate("swap")
    store = AdapterStore(settings.adapters_dir)
    store.delete("swap")
    make_lora_adapter(settings, "swap", seed=302)  # same name, the reference's weights
    assert generate("swap") == generate("swap-reference") != first
    store.delete("swap")
    with pytest.raises(grpc.RpcError) as caught:
        generate("swap")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def write_broken_adapter(settings, name: str, kind: str, broken_metadata: bool = False) -> None:
    """An adapter folder whose files are garbage, as a crashed writer or a bad copy could leave one."""
    folder = settings.adapters_dir / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4')  # truncated JSON
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)
    base_model = {"llm": "tiny-llm", "diffusion": "tiny-sd"}[kind]
    metadata = "{not json" if broken_metadata else json.dumps({"kind": kind, "base_model": base_model})
    (folder / "modelworks.json").write_text(metadata)


def assert_no_internals(details: str, settings) -> None:
    assert str(settings.data_dir) not in details and "/" not in details, details
    for internal in ("Traceback", "Error(", "Exception", "safetensors", "JSONDecode", "line 1 column"):
        assert internal not in details, details


def test_error_messages_never_show_paths_or_library_internals(llm_stub, settings):
    write_broken_adapter(settings, "broken-files", "llm")
    write_broken_adapter(settings, "broken-metadata", "llm", broken_metadata=True)
    for adapter, code in (
        ("broken-files", grpc.StatusCode.FAILED_PRECONDITION),
        ("broken-metadata", grpc.StatusCode.FAILED_PRECONDITION),
        ("missing-adapter", grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            llm_stub.Generate(llm_pb2.GenerateRequest(prompt="x", adapter=adapter, sampling=SP(max_new_tokens=2)))
        assert caught.value.code() == code, caught.value.details()
        assert adapter in caught.value.details()
        assert_no_internals(caught.value.details(), settings)
    assert llm_stub.Generate(request(max_new_tokens=2)).usage.completion_tokens >= 1


def test_greedy_logprobs_equal_the_models_own_log_softmax(llm_stub, tiny_llm):
    import torch

    prompt = "def parse(text):"
    response = llm_stub.Generate(request(prompt, max_new_tokens=10, ignore_eos=True, top_logprobs=4))
    assert len(response.logprobs) == 10
    prompt_ids = tiny_llm.tokenizer(prompt)["input_ids"]
    ids = prompt_ids + [lp.id for lp in response.logprobs]
    with torch.no_grad():
        logits = tiny_llm.model(torch.tensor([ids])).logits[0].float()
    expected = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]
    for position, lp in enumerate(response.logprobs):
        assert abs(lp.logprob - expected[position, lp.id].item()) < 1e-3
        assert lp.top[0].id == lp.id, "greedy picks the likeliest"
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].logprob == lp.logprob and len(lp.top) == 4
    assert all(lp.token == lp.token_bytes.decode("utf-8", errors="replace") for lp in response.logprobs)
    assert b"".join(lp.token_bytes for lp in response.logprobs).decode("utf-8", errors="replace").replace(
        "\ufffd", ""
    ) == response.text.replace("\ufffd", ""), "the tokens' bytes spell the text"


def test_streamed_logprobs_cover_every_token_once(llm_stub):
    unary = llm_stub.Generate(request("x = [", max_new_tokens=12, ignore_eos=True, logprobs=True))
    chunks = list(llm_stub.GenerateStream(request("x = [", max_new_tokens=12, ignore_eos=True, logprobs=True)))
    streamed = [lp for c in chunks for lp in c.logprobs]
    assert [lp.id for lp in streamed] == [lp.id for lp in unary.logprobs]
    assert all(not lp.top for lp in streamed), "no alternatives unless top_logprobs asks"


def test_a_json_schema_through_the_service_gives_json_that_validates(llm_stub):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = llm_pb2.ResponseFormat(json_schema=json.dumps(schema))
    for seed in range(3):
        response = llm_stub.Generate(
            llm_pb2.GenerateRequest(
                prompt="x", response_format=fmt, sampling=SP(max_new_tokens=200, temperature=1.0, seed=seed)
            )
        )
        assert response.finish_reason == llm_pb2.FINISH_REASON_EOS
        jsonschema.validate(json.loads(response.text), schema)


def test_a_stop_token_id_ends_generation_with_stop(llm_stub):
    free = llm_stub.Generate(request("x = [", max_new_tokens=12, ignore_eos=True, logprobs=True))
    stop_at = free.logprobs[5].id
    first = [lp.id for lp in free.logprobs].index(stop_at)
    stopped = llm_stub.Generate(request("x = [", max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]))
    assert stopped.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert stopped.usage.completion_tokens == first + 1


def test_an_adapter_alone_runs_on_its_base_model_and_is_listed_under_it(llm_stub, adapters):
    named = llm_stub.Generate(llm_pb2.GenerateRequest(prompt="x =", model="tiny-llm", adapter=adapters[0]))
    alone = llm_stub.Generate(llm_pb2.GenerateRequest(prompt="x =", adapter=adapters[0]))
    assert alone.text == named.text
    (model,) = [m for m in llm_stub.ListModels(llm_pb2.ListModelsRequest()).models if m.kind == "llm"]
    assert set(adapters) <= set(model.adapters)


def test_an_adapter_whose_base_is_not_served_says_so(llm_stub, settings):
    from shared.adapters import AdapterInfo, AdapterStore

    store = AdapterStore(settings.adapters_dir)
    store.save(AdapterInfo(name="orphan-adapter", kind="llm", base_model="llama-70b"), lambda folder: None)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            llm_stub.Generate(llm_pb2.GenerateRequest(prompt="x", adapter="orphan-adapter"))
    finally:
        store.delete("orphan-adapter")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "trained on base model 'llama-70b', which this server does not serve" in caught.value.details()


def test_every_logits_adjustment_is_served_end_to_end(llm_stub, tokenizer):
    """min_new_tokens, logit_bias and the three penalties change the engine's logits in place: each works through
    the server, not only in unit tests (a bias or min_new_tokens once failed with INTERNAL)."""
    favoured = tokenizer.encode("x", add_special_tokens=False)[0]
    reply = llm_stub.Generate(
        request(
            max_new_tokens=6, min_new_tokens=6, logit_bias={favoured: 100.0}, repetition_penalty=1.2,
            frequency_penalty=0.5, presence_penalty=0.5, ignore_eos=False,
        )
    )  # fmt: skip
    assert reply.usage.completion_tokens == 6, "min_new_tokens holds back the end of sequence"
    assert "x" in reply.text, "a +100 bias makes its token come"
