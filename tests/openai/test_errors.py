"""Every error in OpenAI's envelope with the status the SDK maps to its exception, and the keys of the
services' config guarding the API (401), their scopes (403) and rate limits (429, with retry-after)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import yaml

from tests.conftest import HELD_TOKENS, start_server
from tests.gateway.conftest import running_requests
from tests.harness import spawn_openai, wait_for
from tests.openai.conftest import BODY_LIMIT, openai_config, sdk_client
from tests.scrape import metric_value

CHAT = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ADA, IMAGES_ONLY, BURST = "ada-key-0123456789abcdef", "img-key-0123456789abcdef", "burst-key-0123456789abcdef"
KEYS = yaml.safe_dump(
    [
        {"name": "ada", "key": ADA, "scopes": ["inference"]},
        {"name": "painter", "key": IMAGES_ONLY, "scopes": ["images"]},
        {"name": "burst", "key": BURST, "scopes": ["inference"], "requests_per_minute": 1},
    ],
    default_flow_style=True,
)


@pytest.fixture(scope="module")
def keyed_api(data_dir, unreachable, tmp_path_factory):
    """A keyed LLM service and the API in front of it, both reading the same keys."""
    env = {"MODELWORKS_API_KEYS": KEYS}
    llm = start_server("llm", data_dir, tmp_path_factory.mktemp("keyed-llm"), env=env)
    config = openai_config(llm.address, unreachable, unreachable, model_list_ttl_s=3600)
    api = spawn_openai(tmp_path_factory.mktemp("keyed-openai"), config, env=env)
    yield api
    api.stop()
    llm.stop()


def test_keys_are_checked_and_passed_on_with_their_scopes_and_limits(keyed_api):
    assert sdk_client(keyed_api, ADA).chat.completions.create(**CHAT).choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        sdk_client(keyed_api, "wrong-key-0123456789").chat.completions.create(**CHAT)
    reply = httpx.post(f"{keyed_api.address}/chat/completions", json=CHAT)
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    # refused before routing, yet counted under the route it asked for, as the answered call is
    counted = {
        status: metric_value(keyed_api, "modelworks_openai_requests_total", route="/v1/chat/completions", status=status)
        for status in ("200", "401")
    }
    assert counted == {"200": 1, "401": 2}
    with pytest.raises(openai.PermissionDeniedError, match="'inference' scope"):
        sdk_client(keyed_api, IMAGES_ONLY).chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError, match="rate limit reached") as limited:
        for _ in range(3):  # one call a minute: the model lookup takes it, the generation is refused
            sdk_client(keyed_api, BURST).chat.completions.create(**CHAT)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    image_url = httpx.get(f"{keyed_api.address}/images/files/no-such-token.png")  # its token is its key
    assert image_url.status_code == 404


@pytest.mark.parametrize(
    ("overrides", "error", "expected"),
    [
        ({"temperature": -1}, openai.BadRequestError, "temperature"),
        ({"top_p": 0}, openai.BadRequestError, "top_p"),
        ({"max_tokens": 10**9}, openai.BadRequestError, "max_new_tokens"),
        ({"messages": []}, openai.BadRequestError, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError, "wizard"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            openai.BadRequestError,
            "image_url",
        ),
        ({"n": 1000}, openai.BadRequestError, "n"),
        ({"logit_bias": {"dog": 3}}, openai.BadRequestError, "token ids"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
            openai.BadRequestError,
            "schema",
        ),
        (
            {"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
            openai.BadRequestError,
            "tool_choice",
        ),
        ({"model": "gpt-17"}, openai.NotFoundError, "gpt-17"),
        ({"max_tokens": 2**40}, openai.BadRequestError, "out of range"),
        ({"extra_body": {"stop_token_ids": [-1]}}, openai.BadRequestError, "out of range"),
        ({"logit_bias": {str(2**40): 1}}, openai.BadRequestError, "out of range"),
        (
            {
                "tool_choice": {"type": "function", "function": "f"},
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            openai.BadRequestError,
            "tool_choice",
        ),
    ],
)
def test_bad_requests_get_the_sdks_matching_exception_and_a_readable_message(client, overrides, error, expected):
    with pytest.raises(error, match=expected) as raised:
        client.chat.completions.create(**(CHAT | overrides))
    assert "Traceback" not in str(raised.value)


def test_bodies_that_are_not_requests_get_400_in_openais_envelope(api):
    for body in (b"{not json", b"[]", json.dumps({"model": 3}).encode()):
        reply = httpx.post(
            f"{api.address}/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400, reply.text
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    for body in (b"{not json", b"[]"):  # as one chunked body, too
        reply = httpx.post(
            f"{api.address}/chat/completions", content=iter([body]), headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400, reply.text
    missing = httpx.get(f"{api.address}/no/such/endpoint")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]


def test_a_service_that_is_down_is_a_503_naming_it(real_api):
    with pytest.raises(openai.InternalServerError, match="diffusion service is unreachable") as raised:
        sdk_client(real_api).images.generate(prompt="a lighthouse")
    assert raised.value.status_code == 503
    models = sdk_client(real_api).models.list()  # the LLM service still answers
    assert "smollm2-135m-instruct" in [m.id for m in models]
    assert {m.model_extra["kind"] for m in models} <= {"llm", "llm-adapter"}, "no image model: that service is down"


def test_it_refuses_to_listen_beyond_loopback_without_a_key(tmp_path):
    import subprocess
    import sys

    from tests.harness import REPO_ROOT

    config = tmp_path / "openai.yaml"
    config.write_text(yaml.safe_dump({"models": []}))
    env = {"PATH": "/usr/bin:/bin", "MODELWORKS_CONFIG": str(config)}
    argv = [sys.executable, "-m", "services.openai", "--bind", "0.0.0.0", "--port", "0", "--metrics-port", "-1"]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "set an API key" in done.stderr


def test_fields_sent_as_null_mean_their_default_and_a_negative_seed_is_taken(api):
    body = CHAT | {"n": None, "stream": None, "logprobs": None, "stop": None, "temperature": None, "seed": -1}
    reply = httpx.post(f"{api.address}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1 and reply.json()["choices"][0]["logprobs"] is None


def test_a_body_past_the_limit_is_413_whether_its_length_is_declared_or_chunked(api):
    big = json.dumps(CHAT | {"padding": "x" * (BODY_LIMIT + 1)}).encode()
    headers = {"content-type": "application/json"}
    declared = httpx.post(f"{api.address}/chat/completions", content=big, headers=headers)
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    chunked = httpx.post(f"{api.address}/chat/completions", content=chunks, headers=headers)
    for reply in (declared, chunked):
        assert reply.status_code == 413 and "max_request_bytes" in reply.json()["error"]["message"], reply.text
        assert reply.headers["x-should-retry"] == "false"


def test_a_client_that_goes_away_during_a_unary_call_frees_its_slot(api, llm_server):
    import socket
    from urllib.parse import urlsplit

    before = running_requests(llm_server)
    url = urlsplit(api.address)
    body = json.dumps(CHAT | {"max_tokens": HELD_TOKENS, "ignore_eos": True}).encode()
    head = (
        f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port)) as connection:
        connection.sendall(head + body)
        wait_for(lambda: running_requests(llm_server) == before + 1, 60, "the generation to hold a slot")
    wait_for(lambda: running_requests(llm_server) == before, 60, "the slot to be freed")
