"""Wire the LLM service together: server bootstrap, servicer, models loaded after the port is up."""

from __future__ import annotations

import asyncio

from modelworks.llm.v1 import llm_pb2_grpc
from services.llm.host import ModelHost
from services.llm.servicer import SERVICE_NAME, LLMServicer
from shared.serving import GrpcService, ServerOptions
from shared.settings import Settings


async def serve(settings: Settings, options: ServerOptions) -> None:
    service = GrpcService(settings, options, [SERVICE_NAME])
    host = ModelHost(settings)
    llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(host), service.server)
    await service.start()  # health answers NOT_SERVING while the models load
    try:
        await asyncio.to_thread(host.load_all)
    except BaseException:
        await service.server.stop(0)
        host.shutdown()
        raise
    await service.set_ready()

    async def stop_engines() -> None:
        await asyncio.to_thread(host.shutdown)

    await service.wait_for_termination(on_shutdown=stop_engines)
