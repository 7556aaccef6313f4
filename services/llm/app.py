"""Wire the LLM service together: the servicer over a host of continuous-batching engines."""

from __future__ import annotations

from modelworks.llm.v1 import llm_pb2_grpc
from services.llm.host import llm_host
from services.llm.servicer import SERVICE_NAME, LLMServicer
from shared.serving import ServerOptions, serve_models
from shared.settings import Settings


async def serve(settings: Settings, options: ServerOptions) -> int:
    host = llm_host(settings)
    return await serve_models(
        settings,
        options,
        SERVICE_NAME,
        host,
        lambda server: llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(host), server),
    )
