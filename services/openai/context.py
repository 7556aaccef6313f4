"""What every route reads: the settings, the keys, the service clients, the model catalog and the image store.

Built in the server's lifespan (the gRPC channels belong to its event loop) and reached through FastAPI
dependencies: `Ctx` for the context, `Auth` for the metadata a request's calls carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.openai.auth import caller_metadata
from services.openai.catalog import ModelCatalog
from services.openai.clients import Metadata, ServiceClients
from services.openai.image_store import ImageStore
from shared.auth import KeyRing
from shared.settings import OpenAISettings


@dataclass
class Context:
    settings: OpenAISettings
    keys: KeyRing
    clients: ServiceClients
    catalog: ModelCatalog
    images: ImageStore


def _context(request: Request) -> Context:
    return request.app.state.context


def _metadata(request: Request) -> Metadata:
    return caller_metadata(request.app.state.context.keys, request)


Ctx = Annotated[Context, Depends(_context)]
Auth = Annotated[Metadata, Depends(_metadata)]
