"""Wire the LLM service together: the servicer over a host of continuous-batching engines."""

from __future__ import annotations

from modelworks.llm.v1 import llm_pb2_grpc
from services.llm.host import embedding_host, llm_host
from services.llm.servicer import SERVICE_NAME, LLMServicer
from shared.adapters import AdapterStore
from shared.hosting import ModelHosts
from shared.serving import ServerOptions, serve_models
from shared.settings import Settings


async def serve(settings: Settings, options: ServerOptions) -> int:
    llms, embedders = llm_host(settings), embedding_host(settings)
    return await serve_models(
        settings,
        options,
        SERVICE_NAME,
        ModelHosts(llms, embedders),
        lambda server: llm_pb2_grpc.add_LLMServiceServicer_to_server(
            LLMServicer(llms, embedders, AdapterStore(settings.adapters_dir)), server
        ),
    )
