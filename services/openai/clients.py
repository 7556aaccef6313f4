"""The three services' gRPC stubs (asyncio), and the call helpers that turn their failures into HTTP errors.

The caller's own key is sent on each call, so the services apply its scopes, limits and ownership exactly
as they do for a gRPC client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from modelworks.diffusion.v1 import diffusion_pb2_grpc
from modelworks.finetune.v1 import finetune_pb2_grpc
from modelworks.llm.v1 import llm_pb2_grpc
from services.openai.errors import from_rpc_error
from shared.channels import CHANNEL_OPTIONS
from shared.settings import OpenAISettings

T = TypeVar("T")

# Listings and job control answer at once; generation streams have no deadline (the client ends them).
QUICK_CALL_S = 30.0
Metadata = tuple[tuple[str, str], ...]


class ServiceClients:
    """One asyncio channel per service; built inside the server's event loop, closed with `close()`."""

    def __init__(self, settings: OpenAISettings):
        self._channels = {
            "LLM": grpc.aio.insecure_channel(settings.llm_target, options=CHANNEL_OPTIONS),
            "diffusion": grpc.aio.insecure_channel(settings.diffusion_target, options=CHANNEL_OPTIONS),
            "fine-tune": grpc.aio.insecure_channel(settings.finetune_target, options=CHANNEL_OPTIONS),
        }
        self.llm = llm_pb2_grpc.LLMServiceStub(self._channels["LLM"])
        self.diffusion = diffusion_pb2_grpc.DiffusionServiceStub(self._channels["diffusion"])
        self.finetune = finetune_pb2_grpc.FineTuneServiceStub(self._channels["fine-tune"])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


async def call(service: str, pending: Awaitable[T]) -> T:
    """Await a unary call; a gRPC failure becomes the matching HTTP error."""
    try:
        return await pending
    except grpc.RpcError as error:
        raise from_rpc_error(error, service) from None


async def quick_call(service: str, method, request, metadata: Metadata):
    """A listing or job-control call: it answers at once, or fails after QUICK_CALL_S."""
    return await call(service, method(request, metadata=metadata, timeout=QUICK_CALL_S))


@asynccontextmanager
async def translated(service: str) -> AsyncIterator[None]:
    """Inside it, a gRPC failure (a stream's read) becomes the matching HTTP error."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error, service) from None
