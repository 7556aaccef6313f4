"""Errors in OpenAI's envelope, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status the
`openai` SDKs map to their exceptions (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, …).

The services' gRPC statuses are mapped here, in one place; their messages are written for users and are
passed on as they are. Nothing else reaches a client: an unexpected exception is a 500 with no trace.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("openai")

# status -> OpenAI's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",  # the client went away: nobody reads it
    500: "server_error",
    501: "invalid_request_error",
    503: "server_error",
    504: "server_error",
}

_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 503,  # the service cancelled it (shutting down): a retry goes elsewhere
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# The SDKs retry 409 and 5xx by default; these a retry cannot mend (x-should-retry is the SDKs' own header).
NOT_RETRIED = {409, 413, 501}


class APIError(Exception):
    """An error to send as OpenAI's envelope; `headers` carries `retry-after` for 429s."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        if status in NOT_RETRIED:
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_supported(what: str, why: str, param: str | None = None) -> APIError:
    return APIError(400, f"{what} is not supported: {why}", param=param, code="unsupported_parameter")


@contextmanager
def proto_values(what: str) -> Iterator[None]:
    """Around building a request's protobuf: a number past its field's range (protobuf's ValueError) is the
    client's error, a 400, not the server's."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise invalid(f"a value of the {what} is out of range ({exc}); see docs/openai.md for the limits") from None


def _retry_after(error: grpc.aio.AioRpcError | grpc.RpcError) -> dict[str, str]:
    metadata = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == "retry-after":
            return {"retry-after": str(value)}
    return {}


def from_rpc_error(error: grpc.RpcError, service: str) -> APIError:
    """The HTTP error for a service's gRPC status: its message as it is, UNAVAILABLE as 503 naming the service."""
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and not details.startswith(("the ", "The ")):
        details = f"the {service} service is unreachable ({details}); retry shortly"
    status = _STATUS_OF_CODE.get(code)
    if status is None:
        log.error("a service failed", extra={"service": service, "code": code.name, "details": details})
        return APIError(500, f"the {service} service failed ({code.name}); the operator's logs say why")
    if status == 429 and "message larger than max" in details:  # gRPC's own message-size limit
        status, details = 413, f"the request or its answer is too large for the {service} service ({details})"
    codes = {404: "not_found", 409: "conflict", 413: "too_large", 429: "rate_limit_exceeded", 403: "insufficient_scope"}
    headers = _retry_after(error) if status == 429 else {}
    return APIError(status, details, code=codes.get(status), headers=headers)


def _validation_message(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = f"{param} is required"
    elif first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
        param = None
    elif param:
        message = f"{param}: {message}"
    return invalid(message, param)


def install_handlers(app: FastAPI) -> None:
    """Every error a route can raise answered in OpenAI's envelope."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_message(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see docs/openai.md for what is served)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("an unexpected error", extra={"path": request.url.path})
        return APIError(500, "the OpenAI API server failed unexpectedly; the operator's logs say why").response()
