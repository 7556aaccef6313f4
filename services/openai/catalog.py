"""Which model ids exist, and what each names: an LLM, an embedding model, an image model, or an adapter.

OpenAI has one `model` field where ModelWorks has a base model and an adapter: an id that is not a base
model is looked up as an adapter (a fine-tuned model id is its adapter's name). The services' listings are
reused for `openai.model_list_ttl_s`, per key (what a key sees is its own; a refresh counts against the key's
rate limit like any call); an id not found is looked up again at once, so an adapter that finished training a
moment ago is served without waiting.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.finetune.v1 import finetune_pb2
from modelworks.llm.v1 import llm_pb2
from services.openai.clients import Metadata, ServiceClients, quick_call
from services.openai.errors import APIError


@dataclass(frozen=True)
class ModelCard:
    id: str
    kind: str  # "llm", "embedding", "diffusion", "llm-adapter", "diffusion-adapter"
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None
    owned_by: str = "modelworks"
    created: int = 0

    def to_openai(self) -> dict:
        out = {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}
        out |= {"kind": self.kind, "parent": self.parent}
        if self.max_model_len:
            out["max_model_len"] = self.max_model_len
        return out


@dataclass
class _Listing:
    at: float
    models: list = field(default_factory=list)


def not_found(model: str) -> APIError:
    return APIError(
        404,
        f"the model {model!r} does not exist here: GET /v1/models lists the models and adapters this key may use",
        param="model",
        code="model_not_found",
    )


class ModelCatalog:
    def __init__(self, clients: ServiceClients, ttl_s: float):
        self.clients = clients
        self.ttl_s = ttl_s
        self._listings: dict[tuple[str, Metadata], _Listing] = {}

    async def _models(self, service: str, metadata: Metadata, fresh: bool = False) -> list:
        """The service's ModelInfo list for this key, reused for `ttl_s`."""
        listing = self._listings.get((service, metadata))
        if fresh or listing is None or time.monotonic() - listing.at > self.ttl_s:
            if service == "LLM":
                reply = await quick_call(service, self.clients.llm.ListModels, llm_pb2.ListModelsRequest(), metadata)
            else:
                request = diffusion_pb2.ListModelsRequest()
                reply = await quick_call(service, self.clients.diffusion.ListModels, request, metadata)
            listing = _Listing(time.monotonic(), list(reply.models))
            self._listings[(service, metadata)] = listing
        return listing.models

    async def resolve_llm(self, model: str, metadata: Metadata, kind: str = "llm") -> tuple[str, str]:
        """(base model, adapter) for an id of a model of `kind` or of an adapter; 404 if there is none."""
        for fresh in (False, True):
            for info in await self._models("LLM", metadata, fresh):
                if info.name == model and info.kind == kind:
                    return model, ""
                if kind == "llm" and model in info.adapters:
                    return "", model
        raise not_found(model)

    async def resolve_diffusion(self, model: str | None, metadata: Metadata) -> tuple[str, str]:
        """(base model, adapter): an id that is not an image model is an adapter on the default one."""
        if not model:
            return "", ""
        if any(info.name == model for info in await self._models("diffusion", metadata)):
            return model, ""
        return "", model

    async def cards(self, metadata: Metadata) -> list[ModelCard]:
        """Every model and adapter the key may use; a service it has no scope for (or that is down) is left out,
        unless none answers."""
        sources = [self._llm_cards(metadata), self._diffusion_cards(metadata), self._diffusion_adapter_cards(metadata)]
        results = await asyncio.gather(*sources, return_exceptions=True)
        cards = [card for result in results if isinstance(result, list) for card in result]
        errors = [result for result in results if isinstance(result, BaseException)]
        if not cards and errors:
            raise errors[0]
        return cards

    async def _llm_cards(self, metadata: Metadata) -> list[ModelCard]:
        cards = []
        for info in await self._models("LLM", metadata, fresh=True):
            cards.append(ModelCard(info.name, info.kind, max_model_len=info.max_context_length or None))
            cards += [ModelCard(name, "llm-adapter", parent=info.name) for name in info.adapters]
        return cards

    async def _diffusion_cards(self, metadata: Metadata) -> list[ModelCard]:
        return [ModelCard(info.name, "diffusion") for info in await self._models("diffusion", metadata, fresh=True)]

    async def _diffusion_adapter_cards(self, metadata: Metadata) -> list[ModelCard]:
        request = finetune_pb2.ListAdaptersRequest(kind=finetune_pb2.JOB_KIND_DIFFUSION)
        reply = await quick_call("fine-tune", self.clients.finetune.ListAdapters, request, metadata)
        return [
            ModelCard(
                a.name,
                "diffusion-adapter",
                parent=a.base_model,
                owned_by=a.owner or "modelworks",
                created=int(a.created_at),
            )
            for a in reply.adapters
        ]
