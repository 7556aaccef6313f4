"""Where the services are, how to reach them, and what a failed call means for the exit status."""

from __future__ import annotations

import os
import sys
from collections import namedtuple
from dataclasses import dataclass, field

import grpc

from modelworks.diffusion.v1 import diffusion_pb2_grpc
from modelworks.finetune.v1 import finetune_pb2_grpc
from modelworks.llm.v1 import llm_pb2_grpc

DEFAULT_TARGETS = {"llm": "127.0.0.1:50051", "diffusion": "127.0.0.1:50052", "finetune": "127.0.0.1:50053"}
SERVICE_TITLES = {"llm": "LLM", "diffusion": "diffusion", "finetune": "fine-tune"}
STUBS = {
    "llm": llm_pb2_grpc.LLMServiceStub,
    "diffusion": diffusion_pb2_grpc.DiffusionServiceStub,
    "finetune": finetune_pb2_grpc.FineTuneServiceStub,
}

# The caller got something wrong (exit 2), as opposed to the service or the network failing (exit 1).
CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Images and dataset pages can be large; the services bound what they send.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]


def default_target(service: str) -> str:
    return os.environ.get(f"MODELWORKS_{service.upper()}_TARGET") or DEFAULT_TARGETS[service]


class _ApiKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call, as the services' auth interceptor expects."""

    def __init__(self, key: str):
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or []), self._header]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


class _CallDetails(
    namedtuple("_CallDetails", ["method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"]),
    grpc.ClientCallDetails,
):
    """A call's details with other metadata (grpc's interface, filled in by a namedtuple)."""


@dataclass
class Clients:
    """Opens a channel to a service the first time a command needs it; remembers which, for error messages."""

    targets: dict[str, str]
    api_key: str = ""
    used: str = ""
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, service: str) -> grpc.Channel:
        self.used = service
        if service not in self._channels:
            channel = grpc.insecure_channel(self.targets[service], options=CHANNEL_OPTIONS)
            if self.api_key:
                channel = grpc.intercept_channel(channel, _ApiKey(self.api_key))
            self._channels[service] = channel
        return self._channels[service]

    def stub(self, service: str):
        return STUBS[service](self.channel(service))

    @property
    def llm(self) -> llm_pb2_grpc.LLMServiceStub:
        return self.stub("llm")

    @property
    def diffusion(self) -> diffusion_pb2_grpc.DiffusionServiceStub:
        return self.stub("diffusion")

    @property
    def finetune(self) -> finetune_pb2_grpc.FineTuneServiceStub:
        return self.stub("finetune")

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def describe(service: str, target: str) -> str:
    return f"the {SERVICE_TITLES[service]} service at {target}"


def report_rpc_error(error: grpc.RpcError, clients: Clients) -> int:
    """Print what the service said (no traceback) and return the exit status: 2 the caller's fault, else 1."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or str(error)
    where = describe(clients.used, clients.targets[clients.used]) if clients.used else "the service"
    if code is grpc.StatusCode.UNAVAILABLE:
        print(f"modelworks: {where} is unavailable: {details}", file=sys.stderr)
    else:
        print(f"modelworks: {details} ({code.name} from {where})", file=sys.stderr)
    return 2 if code in CALLER_ERRORS else 1


class CliError(Exception):
    """A failure the CLI explains in one line; `status` is the exit status (2: the caller's input)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status
