"""The shared server bootstrap in-process: error mapping, API keys, health and reflection."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.errors import NotFound
from shared.serving import GrpcService, ServerOptions
from shared.settings import Settings

SERVICE = "modelworks.test.v1.Echo"


async def echo(request: bytes, context) -> bytes:
    if request == b"missing":
        raise NotFound("no such thing 'missing'; known things: a, b")
    if request == b"bug":
        raise KeyError("secret internal detail")
    return request


def identity(x):
    return x


def with_service(settings: Settings, body, methods: dict[str, dict] | None = None, metrics_port: int = -1):
    """Run `body(channel, service)` against a started server that also serves raw-bytes unary `methods`
    ({service name: {method name: behaviour}}; by default an Echo service's Say)."""

    async def main():
        options = ServerOptions(bind_address="127.0.0.1", metrics_port=metrics_port)
        service = GrpcService(settings, options, [SERVICE])
        for name, behaviours in (methods or {SERVICE: {"Say": echo}}).items():
            handlers = {m: grpc.unary_unary_rpc_method_handler(b, identity, identity) for m, b in behaviours.items()}
            service.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        await service.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                await body(channel, service)
        finally:
            await service.server.stop(0)

    asyncio.run(main())


def say(channel, payload: bytes, metadata=None):
    return channel.unary_unary(f"/{SERVICE}/Say", identity, identity)(payload, metadata=metadata)


def test_errors_map_to_status_codes_and_never_leak_internals():
    async def body(channel, _):
        assert await say(channel, b"hi") == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await say(channel, b"missing")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no such thing 'missing'; known things: a, b"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await say(channel, b"bug")
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in caught.value.details() and "Traceback" not in caught.value.details()
        assert "reference" in caught.value.details()
        assert await say(channel, b"still fine") == b"still fine"

    with_service(Settings(), body)


def test_health_is_not_serving_until_ready():
    async def body(channel, service):
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await service.set_ready()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    with_service(Settings(), body)


def test_api_key_is_required_except_for_health_and_reflection():
    async def body(channel, service):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await say(channel, b"hi")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await say(channel, b"hi", metadata=[("authorization", "Bearer wrong")])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await say(channel, b"hi", metadata=[("authorization", "Bearer s3cret")]) == b"hi"
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await stream.read()
        await stream.done_writing()
        assert SERVICE in [s.name for s in reply.list_services_response.service]

    with_service(Settings(api_key="s3cret"), body)


def test_tls_serves_secure_channels(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed, so no test certificate can be made")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )

    async def main():
        settings = Settings(tls_cert_file=cert, tls_key_file=key)
        service = GrpcService(settings, ServerOptions(bind_address="127.0.0.1"), [SERVICE])
        await service.start()
        await service.set_ready()
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{service.port}", credentials) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        finally:
            await service.server.stop(0)

    asyncio.run(main())
