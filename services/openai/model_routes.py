"""`GET /v1/models` and `/v1/models/{id}`: the LLM, embedding and image models, and every adapter by name."""

from __future__ import annotations

from fastapi import APIRouter

from services.openai.catalog import not_found
from services.openai.context import Auth, Ctx

router = APIRouter()


@router.get("/v1/models")
async def list_models(ctx: Ctx, metadata: Auth):
    return {"object": "list", "data": [card.to_openai() for card in await ctx.catalog.cards(metadata)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, ctx: Ctx, metadata: Auth):
    for card in await ctx.catalog.cards(metadata):
        if card.id == model_id:
            return card.to_openai()
    raise not_found(model_id)
