"""Named, scoped API keys, per-key rate limits and the loopback rule, through a real server and channel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

import grpc
import pytest

from shared.auth import current_caller, key_digest
from shared.ratelimit import RateLimiter
from shared.serving import ExposedWithoutKey, GrpcService, ServerOptions
from shared.settings import Settings
from tests.harness import REPO_ROOT
from tests.shared.test_serving import identity, with_service

LLM = "modelworks.llm.v1.LLMService"  # needs the `inference` scope
FINETUNE = "modelworks.finetune.v1.FineTuneService"  # needs `finetune`
ALICE, BOB, OPS = "alice-key-0123456789", "bob-key-0123456789ab", "ops-key-0123456789abc"


async def whoami(request: bytes, context) -> bytes:
    """Answers with the caller the handler sees, from a worker thread as a servicer's blocking work would."""
    return (await asyncio.to_thread(lambda: current_caller().name)).encode()


class Holder:
    """A handler that stays in flight until the test releases it."""

    def __init__(self):
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def __call__(self, request: bytes, context) -> bytes:
        self.entered.set()
        await self.release.wait()
        return b"released"


HOLDER: Holder | None = None


async def hold(request: bytes, context) -> bytes:
    return await HOLDER(request, context)


def keyed_settings(**extra) -> Settings:
    return Settings(
        api_keys=[
            {"name": "alice", "key": ALICE, "scopes": ["inference"], "requests_per_minute": 2},
            {"name": "bob", "key_sha256": key_digest(BOB), "scopes": ["inference", "finetune"]},
            {"name": "ops", "key": OPS, "scopes": ["admin"], "max_concurrent_requests": 1},
        ],
        **extra,
    )


def with_services(settings: Settings, body, metrics_port: int = -1):
    methods = {name: {"WhoAmI": whoami, "Hold": hold} for name in (LLM, FINETUNE)}
    with_service(settings, body, methods, metrics_port)


def call(channel, service: str, key: str | None):
    metadata = [("authorization", f"Bearer {key}")] if key else None
    return channel.unary_unary(f"/{service}/WhoAmI", identity, identity)(b"", metadata=metadata)


async def refused(awaitable, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def test_each_key_is_its_own_caller_and_needs_the_scope_of_the_service():
    async def body(channel, _):
        assert await call(channel, LLM, BOB) == b"bob"  # a key given by its SHA-256 only
        assert await call(channel, FINETUNE, BOB) == b"bob"
        assert await call(channel, FINETUNE, OPS) == b"ops"  # admin may call everything
        error = await refused(call(channel, FINETUNE, ALICE), grpc.StatusCode.PERMISSION_DENIED)
        assert "'alice' lacks the 'finetune' scope (it has: inference)" in error.details()
        await refused(call(channel, LLM, "not-a-key"), grpc.StatusCode.UNAUTHENTICATED)
        await refused(call(channel, LLM, None), grpc.StatusCode.UNAUTHENTICATED)

    with_services(keyed_settings(), body)


def test_the_single_api_key_is_the_admin_key_and_no_key_means_the_local_user():
    async def body(channel, _):
        assert await call(channel, FINETUNE, "s3cret") == b"admin"

    with_services(Settings(api_key="s3cret"), body)

    async def local(channel, _):
        assert await call(channel, FINETUNE, None) == b"local"

    with_services(Settings(), local)


def test_a_key_past_its_rate_limit_is_told_when_to_retry_and_other_keys_are_unaffected():
    """alice may make 2 calls a minute: a burst of 2 passes, the third waits ~30 s for its token."""

    async def body(channel, service):
        assert await call(channel, LLM, ALICE) == b"alice"
        assert await call(channel, LLM, ALICE) == b"alice"
        error = await refused(call(channel, LLM, ALICE), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "'alice' may make 2 requests a minute; retry in" in error.details()
        retry_after = dict(error.trailing_metadata() or ())["retry-after"]
        assert 1 <= int(retry_after) <= 30
        for _ in range(5):
            assert await call(channel, LLM, BOB) == b"bob"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read()
        text = metrics.decode()
        assert 'code="RESOURCE_EXHAUSTED",key="alice"' in text and 'key="bob"' in text
        assert ALICE not in text and BOB not in text  # names only, never keys

    with_services(keyed_settings(), body, metrics_port=0)


def test_a_key_at_its_cap_of_calls_in_flight_waits_for_one_to_end():
    async def body(channel, _):
        global HOLDER
        HOLDER = Holder()
        held = asyncio.ensure_future(
            channel.unary_unary(f"/{LLM}/Hold", identity, identity)(b"", metadata=[("authorization", f"Bearer {OPS}")])
        )
        await asyncio.wait_for(HOLDER.entered.wait(), 60)
        error = await refused(call(channel, LLM, OPS), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "'ops' is at its limit of 1 calls in flight" in error.details()
        assert await call(channel, LLM, BOB) == b"bob"  # another key's calls are not counted
        HOLDER.release.set()
        assert await held == b"released"
        assert await call(channel, LLM, OPS) == b"ops"

    with_services(keyed_settings(), body)


def test_the_token_bucket_refills_at_the_keys_rate():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.acquire("k", 60) for _ in range(60)] == [0.0] * 60
    assert limiter.acquire("k", 60) == pytest.approx(1.0)
    now[0] = 0.5
    assert limiter.acquire("k", 60) == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.acquire("k", 60) == 0.0
    assert limiter.acquire("other", 60) == 0.0


def build_service(settings: Settings, address: str) -> None:
    async def main():
        GrpcService(settings, ServerOptions(bind_address=address), [LLM])

    asyncio.run(main())


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.7"])
def test_a_server_beyond_loopback_needs_a_key_or_the_explicit_opt_out(address):
    with pytest.raises(ExposedWithoutKey, match="MODELWORKS_API_KEY"):
        build_service(Settings(), address)
    build_service(Settings(api_key="k"), address)
    build_service(Settings(allow_unauthenticated=True), address)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_key(address):
    build_service(Settings(), address)


def test_servers_listen_on_loopback_by_default():
    assert Settings().bind_address == "127.0.0.1" and ServerOptions().bind_address == "127.0.0.1"


@pytest.mark.parametrize(
    "module,setting",
    [("services.finetune", "MODELWORKS_API_KEY"), ("services.gateway", "MODELWORKS_GATEWAY_AUTH")],
)
def test_a_process_asked_to_listen_on_every_interface_without_a_guard_refuses_to_start(tmp_path, module, setting):
    result = subprocess.run(
        [sys.executable, "-m", module, "--bind", "0.0.0.0", "--port", "0", "--metrics-port", "-1"],
        env={"PATH": "/usr/bin:/bin", "MODELWORKS_DATA_DIR": str(tmp_path), "MODELWORKS_LOG_FORMAT": "text"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert setting in result.stderr and "MODELWORKS_ALLOW_UNAUTHENTICATED" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"name": "a", "scopes": ["inference"]}, "exactly one of key and key_sha256"),
        ({"name": "a", "key": "short"}, "at least 16 characters"),
        ({"name": "a", "key_sha256": "abc"}, "64 lowercase hex"),
        ({"name": "a", "key": ALICE, "scopes": ["root"]}, "scopes"),
    ],
)
def test_bad_key_entries_are_refused_at_start(entry, message):
    with pytest.raises(ValueError, match=message):
        Settings(api_keys=[entry])


def test_key_names_are_unique():
    with pytest.raises(ValueError, match="repeated: admin"):
        Settings(api_key="k", api_keys=[{"name": "admin", "key": ALICE}])


def test_code_outside_an_rpc_has_no_caller_rather_than_every_scope():
    from shared.auth import LOCAL, calling_as

    with pytest.raises(RuntimeError, match="no caller is set"):
        current_caller()
    with calling_as(LOCAL):
        assert current_caller() is LOCAL
