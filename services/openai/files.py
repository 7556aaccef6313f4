"""OpenAI's Files API for `purpose=fine-tune`, on the fine-tune service's dataset store.

An upload is streamed to UploadDataset, which validates every line (or every zip member) before it answers:
a bad file is a 400 naming the line. JSONL files are OpenAI's chat format (`{"messages": [...]}`) or
prompt/completion; a zip is an image folder for a diffusion fine-tune.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from modelworks.finetune.v1 import finetune_pb2
from services.openai.clients import call, quick_call, translated
from services.openai.context import Auth, Ctx
from services.openai.errors import invalid, not_supported

router = APIRouter()
SERVICE = "fine-tune"
CHUNK_BYTES = 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
PURPOSE = "fine-tune"
MAX_LISTED = 10_000


def file_object(dataset: finetune_pb2.Dataset) -> dict:
    return {
        "id": dataset.id,
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": int(dataset.created_at),
        "filename": dataset.name,
        "purpose": PURPOSE,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
        "records": dataset.num_records,
        "record_type": dataset.record_type,
    }


async def _chunks(upload: UploadFile, name: str, first: bytes) -> AsyncIterator[finetune_pb2.UploadDatasetRequest]:
    fmt = "imagefolder_zip" if first.startswith(ZIP_MAGIC) else "jsonl"
    yield finetune_pb2.UploadDatasetRequest(info=finetune_pb2.DatasetInfo(name=name, format=fmt))
    chunk = first
    while chunk:
        yield finetune_pb2.UploadDatasetRequest(chunk=chunk)
        chunk = await upload.read(CHUNK_BYTES)


@router.post("/v1/files")
async def upload(ctx: Ctx, metadata: Auth, request: Request):
    async with request.form(max_files=1) as form:  # its spooled file is removed on the way out
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("file is required: the JSONL (or zip) to upload, as multipart form data", "file")
        if purpose != PURPOSE:
            raise not_supported(
                f"purpose {purpose!r}", "this server stores files for fine-tuning only (fine-tune)", "purpose"
            )
        first = await upload.read(CHUNK_BYTES)
        if not first:
            raise invalid("the file is empty", "file")
        name = upload.filename or "upload"
        dataset = await call(
            SERVICE, ctx.clients.finetune.UploadDataset(_chunks(upload, name, first), metadata=metadata)
        )
        return file_object(dataset)


@router.get("/v1/files")
async def list_files(
    ctx: Ctx,
    metadata: Auth,
    purpose: str | None = None,
    limit: int = MAX_LISTED,
    after: str | None = None,
    order: str = "desc",
):
    if not 1 <= limit <= MAX_LISTED:
        raise invalid(f"limit must be in [1, {MAX_LISTED}], got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise invalid(f"order is {order!r}; use asc or desc", "order")
    reply = await quick_call(SERVICE, ctx.clients.finetune.ListDatasets, finetune_pb2.ListDatasetsRequest(), metadata)
    files = [] if purpose not in (None, PURPOSE) else [file_object(d) for d in reply.datasets]
    files.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order == "desc")
    if after:
        ids = [f["id"] for f in files]
        files = files[ids.index(after) + 1 :] if after in ids else []
    page = files[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(files) > len(page),
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


@router.get("/v1/files/{file_id}")
async def retrieve(file_id: str, ctx: Ctx, metadata: Auth):
    request = finetune_pb2.GetDatasetRequest(id=file_id)
    return file_object(await quick_call(SERVICE, ctx.clients.finetune.GetDataset, request, metadata))


@router.get("/v1/files/{file_id}/content")
async def content(file_id: str, ctx: Ctx, metadata: Auth):
    stream = ctx.clients.finetune.ReadDataset(finetune_pb2.ReadDatasetRequest(id=file_id), metadata=metadata)
    async with translated(SERVICE):
        first = await stream.read()  # NOT_FOUND before the response starts

    async def body() -> AsyncIterator[bytes]:
        message = first
        try:
            while message is not grpc.aio.EOF:
                yield message.chunk
                message = await stream.read()
        finally:
            stream.cancel()

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete(file_id: str, ctx: Ctx, metadata: Auth):
    request = finetune_pb2.DeleteDatasetRequest(id=file_id)
    await quick_call(SERVICE, ctx.clients.finetune.DeleteDataset, request, metadata)
    return {"id": file_id, "object": "file", "deleted": True}
