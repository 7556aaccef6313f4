"""What every route reads: the settings, the service clients, the model catalog and the image store.

Built in the server's lifespan (the gRPC channels belong to its event loop) and reached through FastAPI
dependencies: `Ctx` for the context, `Auth` for the metadata a request's calls carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.openai.catalog import ModelCatalog
from services.openai.clients import Metadata, ServiceClients
from services.openai.image_store import ImageStore
from shared.settings import OpenAISettings


@dataclass
class Context:
    settings: OpenAISettings
    clients: ServiceClients
    catalog: ModelCatalog
    images: ImageStore


def _context(request: Request) -> Context:
    return request.app.state.context


METADATA = "caller_metadata"


def _metadata(request: Request) -> Metadata:
    """The metadata `app.KeyGuard` resolved from the request's key (it checks every /v1 route but image URLs)."""
    return getattr(request.state, METADATA)


Ctx = Annotated[Context, Depends(_context)]
Auth = Annotated[Metadata, Depends(_metadata)]
