"""`POST /v1/embeddings`: texts to the LLM service's Embed (batched there with other calls)."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field

from modelworks.llm.v1 import llm_pb2
from services.openai.clients import call
from services.openai.context import Auth, Ctx
from services.openai.disconnect import unless_disconnected
from services.openai.errors import not_supported, proto_values
from services.openai.schema import OpenAIBody

router = APIRouter()


class EmbeddingRequest(OpenAIBody):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    normalize: bool | None = None  # ModelWorks' extra: unit length or not (unset: the model entry's)

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not all(isinstance(t, str) for t in texts):
            raise not_supported("token-id input", "send the texts themselves (a string or a list of strings)", "input")
        return texts


def _encoded(values, encoding: str) -> list[float] | str:
    if encoding == "float":
        return list(values)
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()  # OpenAI's: little-endian float32


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, ctx: Ctx, metadata: Auth, request: Request):
    model, _ = await ctx.catalog.resolve_llm(body.model, metadata, kind="embedding")
    texts = body.texts()
    with proto_values("request"):
        embed = llm_pb2.EmbedRequest(model=model, inputs=texts, dimensions=body.dimensions or 0)
    if body.normalize is not None:
        embed.normalize = body.normalize
    reply = await unless_disconnected(request, call("LLM", ctx.clients.llm.Embed(embed, metadata=metadata)))
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(e.values, body.encoding_format)}
        for i, e in enumerate(reply.embeddings)
    ]
    tokens = reply.usage.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
