"""One server interceptor for every service: who is calling, what they may do, error mapping, metrics.

- Authentication: with keys configured (`api_key`, `api_keys`), every RPC but health and reflection needs
  `authorization: Bearer <key>`; the key resolves to a `shared.auth.Caller`, which the handler (and all it
  calls, threads included) reads with `current_caller()`. With no key, every call is the local user.
- Scopes: each service needs one (`SERVICE_SCOPES`); a key without it gets PERMISSION_DENIED.
- Rate limits: a key's `requests_per_minute` is a token bucket; past it RESOURCE_EXHAUSTED, with the delay
  in the message and in `retry-after` trailing metadata (seconds).
- Errors: servicers raise `shared.errors.ServiceError` subclasses; this turns them into status codes with
  their message. Anything else becomes INTERNAL with a reference id; the traceback goes to the log, never
  to the client.
- Metrics: every call counted by service, method, code and key name (never the key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable

import grpc

from shared.auth import FINETUNE, IMAGES, INFERENCE, LOCAL, Caller, KeyRing, set_caller
from shared.errors import PermissionDenied, ResourceExhausted, ServiceError, Unauthenticated
from shared.metrics import RPC_LATENCY, RPC_REQUESTS
from shared.ratelimit import InFlight, RateLimiter

log = logging.getLogger(__name__)

# Probes and discovery stay open without a key, as load balancers and grpcurl expect.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# The scope each service's RPCs need; a service not listed needs `admin`.
SERVICE_SCOPES = {
    "modelworks.llm.v1.LLMService": INFERENCE,
    "modelworks.diffusion.v1.DiffusionService": IMAGES,
    "modelworks.finetune.v1.FineTuneService": FINETUNE,
}
NO_KEY = "-"  # the metrics label of a call that presented no valid key


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing | None = None, limiter: RateLimiter | None = None):
        self._keys = keys or KeyRing({})
        self._limiter = limiter or RateLimiter()
        self._in_flight = InFlight()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        service, name = _split_method(method)
        caller, refusal = self.admit(handler_call_details.invocation_metadata or (), service)
        return _wrap_handler(handler, service, name, _Admission(caller, refusal, self._in_flight))

    def admit(self, metadata, service: str) -> tuple[Caller | None, ServiceError | None]:
        """The caller, or why the call is refused before its handler runs."""
        if not self._keys.enabled:
            return LOCAL, None
        supplied = next((value for key, value in metadata if key == "authorization"), None)
        if supplied is None:
            return None, Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        if isinstance(supplied, bytes):
            supplied = supplied.decode("utf-8", "replace")
        scheme, _, key = supplied.partition(" ")
        caller = self._keys.resolve(key.strip()) if scheme == "Bearer" else None
        if caller is None:
            return None, Unauthenticated("invalid API key")
        scope = SERVICE_SCOPES.get(service, "admin")
        try:
            caller.require(scope)
        except PermissionDenied as refusal:
            return caller, refusal
        if caller.requests_per_minute:
            wait_s = self._limiter.acquire(caller.name, caller.requests_per_minute)
            if wait_s > 0:
                return caller, RateLimited(caller, wait_s)
        return caller, None


class RateLimited(ResourceExhausted):
    def __init__(self, caller: Caller, wait_s: float):
        self.retry_after_s = max(1, math.ceil(wait_s))
        super().__init__(
            f"rate limit reached: the API key {caller.name!r} may make {caller.requests_per_minute} requests a "
            f"minute; retry in {wait_s:.1f} s"
        )


class _Admission(contextlib.AbstractContextManager):
    """Around a handler: refuse it (the interceptor's verdict, or the key's cap on calls in flight), or run it
    as its caller, holding one of the key's in-flight slots until it ends."""

    def __init__(self, caller: Caller | None, refusal: ServiceError | None, in_flight: InFlight):
        self.caller, self.refusal, self._in_flight = caller, refusal, in_flight

    def __enter__(self) -> None:
        if self.refusal is not None:
            raise self.refusal
        cap = self.caller.max_concurrent_requests
        if not self._in_flight.enter(self.caller.name, cap):
            raise ResourceExhausted(
                f"the API key {self.caller.name!r} is at its limit of {cap} calls in flight "
                "(max_concurrent_requests); retry when one ends"
            )
        set_caller(self.caller)

    def __exit__(self, *exc) -> None:
        self._in_flight.leave(self.caller.name)


class _Outcome:
    """Tracks a call's status code for the metrics, whatever way the call ends."""

    def __init__(self, service: str, method: str, caller: Caller | None):
        self.service, self.method = service, method
        self.key = caller.name if caller is not None else NO_KEY
        self.code = "OK"
        self.started = time.perf_counter()

    def record(self) -> None:
        RPC_REQUESTS.labels(self.service, self.method, self.code, self.key).inc()
        RPC_LATENCY.labels(self.service, self.method).observe(time.perf_counter() - self.started)


async def _fail(context: grpc.aio.ServicerContext, outcome: _Outcome, exc: BaseException) -> None:
    """Abort the call with the status code that `exc` stands for."""
    if isinstance(exc, ServiceError):
        outcome.code = exc.code
        if isinstance(exc, RateLimited):
            context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    reference = uuid.uuid4().hex[:12]
    outcome.code = "INTERNAL"
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"rpc": f"{outcome.service}/{outcome.method}", "ref": reference, "key": outcome.key},
    )
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {reference}); the server logged it")


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _wrap_handler(handler, service: str, method: str, admission: _Admission):
    if handler.response_streaming:
        behavior = handler.unary_stream if not handler.request_streaming else handler.stream_stream

        async def streaming(request, context):
            outcome = _Outcome(service, method, admission.caller)
            try:
                with admission:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
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
            outcome = _Outcome(service, method, admission.caller)
            try:
                with admission:
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
