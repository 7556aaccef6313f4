"""gRPC clients of the three services, one channel each, with the API key sent on every call when set.

The gateway's only link to ModelWorks: it imports the generated stubs, never a service's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelworks.diffusion.v1 import diffusion_pb2_grpc
from modelworks.finetune.v1 import finetune_pb2_grpc
from modelworks.llm.v1 import llm_pb2_grpc
from services.gateway.config import GatewayConfig
from shared.channels import CHANNEL_OPTIONS

# Unary calls that should answer at once (listings, job control); generation streams have no deadline,
# the user stops them.
QUICK_CALL_S = 10.0
HEALTH_CHECK_S = 2.0


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call (the services' API-key check)."""

    def __init__(self, api_key: str):
        self._header = ("authorization", f"Bearer {api_key}")

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_key(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_key(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


@dataclass(frozen=True)
class Service:
    """One service: its label for people, its address, and its channel."""

    label: str
    target: str
    channel: grpc.Channel

    def health(self) -> str:
        """ "SERVING", "NOT_SERVING", or "UNREACHABLE" when nothing answers."""
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_CHECK_S
            )
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class ServiceClients:
    """The stubs the gateway calls, built from a `GatewayConfig`; `close()` releases the channels."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.llm_service = self._service("LLM", config.llm_target)
        self.diffusion_service = self._service("diffusion", config.diffusion_target)
        self.finetune_service = self._service("fine-tune", config.finetune_target)
        self.llm = llm_pb2_grpc.LLMServiceStub(self.llm_service.channel)
        self.diffusion = diffusion_pb2_grpc.DiffusionServiceStub(self.diffusion_service.channel)
        self.finetune = finetune_pb2_grpc.FineTuneServiceStub(self.finetune_service.channel)

    def _service(self, label: str, target: str) -> Service:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        if self.config.api_key is not None:
            channel = grpc.intercept_channel(channel, _BearerToken(self.config.api_key.get_secret_value()))
        return Service(label, target, channel)

    @property
    def services(self) -> list[Service]:
        return [self.llm_service, self.diffusion_service, self.finetune_service]

    def close(self) -> None:
        for service in self.services:
            service.channel.close()
