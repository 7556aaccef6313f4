"""Wire the diffusion service together: the servicer over a host of batching pipeline engines."""

from __future__ import annotations

from modelworks.diffusion.v1 import diffusion_pb2_grpc
from services.diffusion.host import diffusion_host
from services.diffusion.servicer import SERVICE_NAME, DiffusionServicer
from shared.serving import ServerOptions, serve_models
from shared.settings import Settings


async def serve(settings: Settings, options: ServerOptions) -> int:
    host = diffusion_host(settings)
    return await serve_models(
        settings,
        options,
        SERVICE_NAME,
        host,
        lambda server: diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(DiffusionServicer(host), server),
    )
