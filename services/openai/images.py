"""`POST /v1/images/generations` and `/v1/images/edits` (img2img, and inpainting with a mask) on the
diffusion service; images come back as base64 PNGs (the default) or as URLs this server serves for a while.
The PNGs keep the parameters chunk the diffusion service wrote."""

from __future__ import annotations

import base64
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile

from modelworks.diffusion.v1 import diffusion_pb2
from services.openai.clients import call
from services.openai.context import Auth, Ctx
from services.openai.disconnect import unless_disconnected
from services.openai.errors import APIError, invalid, not_supported, proto_values
from services.openai.schema import OpenAIBody

router = APIRouter()
_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageRequest(OpenAIBody):
    """OpenAI's fields, then ModelWorks' extras; OpenAI's quality, style and background are ignored."""

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1)
    scheduler: str | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # taken modulo 2**64
    adapter_scale: float | None = None
    strength: float | None = None

    def dimensions(self) -> tuple[int, int]:
        if self.size in (None, "", "auto"):
            return 0, 0
        match = _SIZE_RE.match(self.size)
        if not match:
            raise invalid(f"size is {self.size!r}; give WIDTHxHEIGHT, e.g. 512x512, or auto", "size")
        return int(match.group(1)), int(match.group(2))


async def _generate(ctx: Ctx, body: ImageRequest, metadata, request: Request, **images: bytes) -> dict:
    model, adapter = await ctx.catalog.resolve_diffusion(body.model, metadata)
    width, height = body.dimensions()
    fields = {
        "guidance_scale": body.guidance_scale,
        "seed": None if body.seed is None else body.seed % 2**64,
        "adapter_scale": body.adapter_scale,
        "strength": body.strength,
    }
    with proto_values("request"):
        proto = diffusion_pb2.GenerateImagesRequest(
            model=model,
            adapter=adapter,
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or "",
            width=width,
            height=height,
            steps=body.steps or 0,
            num_images=body.n,
            scheduler=body.scheduler or "",
            **{name: value for name, value in fields.items() if value is not None},
            **images,
        )
    pending = call("diffusion", ctx.clients.diffusion.GenerateImages(proto, metadata=metadata))
    reply = await unless_disconnected(request, pending)
    return {"created": int(time.time()), "data": [_datum(ctx, body, image, request) for image in reply.images]}


def _datum(ctx: Ctx, body: ImageRequest, image, request: Request) -> dict:
    out = {"revised_prompt": None, "seed": image.seed, "size": f"{image.width}x{image.height}"}
    if body.response_format == "url":
        base = ctx.settings.public_url or str(request.base_url)
        return out | {"url": f"{base.rstrip('/')}/v1/images/files/{ctx.images.put(image.png)}.png"}
    return out | {"b64_json": base64.b64encode(image.png).decode()}


@router.post("/v1/images/generations")
async def generations(body: ImageRequest, ctx: Ctx, metadata: Auth, request: Request):
    return await _generate(ctx, body, metadata, request)


async def _one_image(form, name: str) -> bytes | None:
    uploads = [v for v in form.getlist(name) + form.getlist(f"{name}[]") if isinstance(v, UploadFile)]
    if len(uploads) > 1:
        raise not_supported(f"more than one {name}", "an edit starts from one image", name)
    return await uploads[0].read() if uploads else None


@router.post("/v1/images/edits")
async def edits(ctx: Ctx, metadata: Auth, request: Request):
    async with request.form() as form:  # its spooled files are removed on the way out
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            body = ImageRequest.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        image = await _one_image(form, "image")
        if image is None:
            raise APIError(400, "image is required: the picture to edit (PNG or JPEG)", param="image")
        mask = await _one_image(form, "mask")
    images = {"init_image": image} | ({"mask_image": mask} if mask else {})
    return await _generate(ctx, body, metadata, request, **images)


@router.get("/v1/images/files/{token}.png")
async def image_file(token: str, ctx: Ctx):
    png = ctx.images.get(token)
    if png is None:
        raise APIError(404, "this image URL has expired or never existed; image URLs are served for a limited time")
    return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})
