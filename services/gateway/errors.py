"""What a person sees when a call fails: the service's own message, or a plain sentence; never a traceback.

The services already word their INVALID_ARGUMENT, NOT_FOUND and RESOURCE_EXHAUSTED messages for users, so
those pass through; transport failures (a stopped service, a refused key) are put in words here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import gradio as gr
import grpc

from services.gateway import metrics
from services.gateway.clients import Service

T = TypeVar("T")

_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}


# words of gRPC's own transport errors (as opposed to a service's message)
_TRANSPORT_WORDS = ("connect", "dns", "socket", "ipv4:", "ipv6:", "unix:", "handshake", "stream removed", "goaway")


def describe(service: Service, error: grpc.RpcError) -> str:
    """A sentence for `error` from `service`, fit for a person."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        return f"The {service.label} service's answer was too large for the gateway; ask for fewer or smaller images."
    if code in _PASS_THROUGH and details:
        return details
    if code == grpc.StatusCode.UNAVAILABLE:
        if not details or any(word in details.lower() for word in _TRANSPORT_WORDS):
            return (
                f"The {service.label} service at {service.target} is not reachable. It may be stopped or still "
                "starting; the other tabs keep working. Try again in a moment."
            )
        return f"The {service.label} service is unavailable: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"The {service.label} service did not answer in time. It may be busy; try again."
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (
            f"The {service.label} service refused the gateway's API key. The operator must give the gateway "
            "the same MODELWORKS_API_KEY as the services."
        )
    if code == grpc.StatusCode.CANCELLED:
        return "The request was cancelled."
    # INTERNAL and the like: the services send a reference id, never internals
    return f"The {service.label} service failed on this request. {details}".strip()


@contextmanager
def user_errors(service: Service, action: str) -> Iterator[None]:
    """Turn a gRPC failure inside the block into a `gr.Error` with a readable message, and count the call."""
    try:
        yield
    except grpc.RpcError as error:
        metrics.CALLS.labels(action, error.code().name if hasattr(error, "code") else "UNKNOWN").inc()
        raise gr.Error(describe(service, error), print_exception=False) from None
    metrics.CALLS.labels(action, "OK").inc()


def call_or_warn(service: Service, action: str, call: Callable[[], T], fallback: T) -> T:
    """Run `call`; if the service fails, show a warning toast and return `fallback` (for listings that fill
    pickers, so one stopped service leaves the rest of the page usable)."""
    try:
        with user_errors(service, action):
            return call()
    except gr.Error as error:
        gr.Warning(error.message)
        return fallback
