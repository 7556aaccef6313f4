"""One server interceptor for every service: API-key check, error mapping, and request metrics.

Servicers raise `shared.errors.ServiceError` subclasses; this turns them into gRPC status codes with
their message. Anything else becomes INTERNAL with a reference id; the traceback goes to the log, never
to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable

import grpc

from shared.errors import ServiceError
from shared.metrics import RPC_LATENCY, RPC_REQUESTS

log = logging.getLogger(__name__)

# Probes and discovery stay open without a key, as load balancers and grpcurl expect.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str | None = None):
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        auth_error = self._auth_error(handler_call_details.invocation_metadata or ())
        service, name = _split_method(method)
        return _wrap_handler(handler, service, name, auth_error)

    def _auth_error(self, metadata) -> str | None:
        if self._expected_auth is None:
            return None
        supplied = next((value for key, value in metadata if key == "authorization"), None)
        if supplied is None:
            return "missing API key: send 'authorization: Bearer <key>' metadata"
        if isinstance(supplied, str):
            supplied = supplied.encode()
        if not hmac.compare_digest(supplied, self._expected_auth):
            return "invalid API key"
        return None


class _Outcome:
    """Tracks a call's status code for the metrics, whatever way the call ends."""

    def __init__(self, service: str, method: str):
        self.service, self.method = service, method
        self.code = "OK"
        self.started = time.perf_counter()

    def record(self) -> None:
        RPC_REQUESTS.labels(self.service, self.method, self.code).inc()
        RPC_LATENCY.labels(self.service, self.method).observe(time.perf_counter() - self.started)


async def _fail(context: grpc.aio.ServicerContext, outcome: _Outcome, exc: BaseException) -> None:
    """Abort the call with the status code that `exc` stands for."""
    if isinstance(exc, ServiceError):
        outcome.code = exc.code
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    reference = uuid.uuid4().hex[:12]
    outcome.code = "INTERNAL"
    log.error("unhandled error", exc_info=exc, extra={"rpc": f"{outcome.service}/{outcome.method}", "ref": reference})
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {reference}); the server logged it")


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _wrap_handler(handler, service: str, method: str, auth_error: str | None):
    if handler.response_streaming:
        behavior = handler.unary_stream if not handler.request_streaming else handler.stream_stream

        async def streaming(request, context):
            outcome = _Outcome(service, method)
            try:
                if auth_error:
                    outcome.code = "UNAUTHENTICATED"
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, auth_error)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                outcome.code = _code_of(context) if outcome.code == "OK" else outcome.code
                raise
            except asyncio.CancelledError:
                outcome.code = "CANCELLED"
                raise
            except Exception as exc:
                await _fail(context, outcome, exc)
            finally:
                outcome.record()

        wrapped = streaming
    else:
        behavior = handler.unary_unary if not handler.request_streaming else handler.stream_unary

        async def unary(request, context):
            outcome = _Outcome(service, method)
            try:
                if auth_error:
                    outcome.code = "UNAUTHENTICATED"
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, auth_error)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                outcome.code = _code_of(context) if outcome.code == "OK" else outcome.code
                raise
            except asyncio.CancelledError:
                outcome.code = "CANCELLED"
                raise
            except Exception as exc:
                await _fail(context, outcome, exc)
            finally:
                outcome.record()

        wrapped = unary
    return _rebuild(handler, wrapped)


_FACTORIES: dict[tuple[bool, bool], Callable] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _rebuild(handler, behavior):
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
