"""OpenAI's fine-tuning jobs on the fine-tune service: create, list, retrieve, cancel, events, checkpoints.

A job trains a LoRA adapter (or DoRA, rsLoRA, p-tuning: the `method` extra); its `fine_tuned_model` is the
adapter's name, usable as `model` the moment the job succeeds. A `validation_file` is evaluated every
`eval_steps`; without one, `validation_fraction` of the training file is held out. Files are validated when
uploaded, so a job is `queued` from the start (never `validating_files`).
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.openai.clients import quick_call
from services.openai.context import Auth, Ctx
from services.openai.errors import invalid, not_supported, proto_values
from services.openai.job_objects import checkpoint_object, event_object, job_object
from services.openai.schema import OpenAIBody

router = APIRouter()
SERVICE = "fine-tune"
MAX_PAGE = 100
Auto = Literal["auto"]


class Hyperparameters(OpenAIBody):
    n_epochs: Auto | int | None = None
    batch_size: Auto | int | None = None
    learning_rate_multiplier: Auto | float | None = None


class Supervised(OpenAIBody):
    hyperparameters: Hyperparameters | None = None


class Method(OpenAIBody):
    type: str
    supervised: Supervised | None = None


class JobCreate(OpenAIBody):
    """OpenAI's fields, then ModelWorks' extras (the fine-tune service's hyperparameters by their names)."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # taken modulo 2**64
    hyperparameters: Hyperparameters | None = None
    method: str | Method | None = None
    adapter_name: str | None = None
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float | None = None
    lora_r: int | None = Field(None, ge=1)
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = None
    lr_scheduler: str | None = None
    warmup_ratio: float | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None
    max_seq_length: int | None = Field(None, ge=1)
    resolution: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=0)
    mixed_precision: str | None = None
    max_grad_norm: float | None = None
    num_virtual_tokens: int | None = Field(None, ge=1)
    random_crop: bool | None = None
    random_flip: bool | None = None

    def openai_hyperparameters(self) -> Hyperparameters:
        if isinstance(self.method, Method):
            if self.method.type != "supervised":
                raise not_supported(
                    f"method {self.method.type!r}", "ModelWorks fine-tunes supervised (SFT) only", "method.type"
                )
            nested = self.method.supervised and self.method.supervised.hyperparameters
            if nested:
                return nested
        return self.hyperparameters or Hyperparameters()

    def adapter_method(self) -> str:
        return self.method if isinstance(self.method, str) else ""


_PASSED_ON = (
    "max_steps",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "lr_scheduler",
    "warmup_ratio",
    "validation_fraction",
    "test_fraction",
    "max_seq_length",
    "resolution",
    "gradient_accumulation_steps",
    "save_steps",
    "eval_steps",
    "early_stopping_patience",
    "mixed_precision",
    "max_grad_norm",
    "num_virtual_tokens",
    "random_crop",
    "random_flip",
    "seed",
)


def _given(value: Any) -> Any:
    return None if value in (None, "auto") else value


def hyperparameters(body: JobCreate) -> pb.Hyperparameters:
    openai = body.openai_hyperparameters()
    fields = {name: getattr(body, name) for name in _PASSED_ON if getattr(body, name) is not None}
    fields |= {
        "method": body.adapter_method(),
        "epochs": _given(openai.n_epochs),
        "batch_size": _given(openai.batch_size),
    }
    fields["learning_rate_multiplier"] = _given(openai.learning_rate_multiplier)
    fields["seed"] = None if body.seed is None else body.seed % 2**64
    with proto_values("hyperparameters"):
        return pb.Hyperparameters(**{name: value for name, value in fields.items() if value is not None})


def adapter_name(body: JobCreate) -> str:
    """The extra `adapter_name`, else `ft-<base>-<suffix>-<random>` in the adapter store's alphabet."""
    if body.adapter_name:
        return body.adapter_name
    stem = "-".join(part for part in ("ft", body.model, body.suffix) if part)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:56].strip("-._")
    return f"{stem}-{secrets.token_hex(3)}"


async def _kind(ctx: Ctx, model: str, metadata) -> int:
    reply = await quick_call(SERVICE, ctx.clients.finetune.ListBaseModels, pb.ListBaseModelsRequest(), metadata)
    return next((m.kind for m in reply.models if m.name == model), pb.JOB_KIND_LLM)  # unknown: the service says so


@router.post("/v1/fine_tuning/jobs")
async def create(body: JobCreate, ctx: Ctx, metadata: Auth):
    request = pb.CreateJobRequest(
        kind=await _kind(ctx, body.model, metadata),
        base_model=body.model,
        dataset_id=body.training_file,
        validation_dataset_id=body.validation_file or "",
        adapter_name=adapter_name(body),
        hyperparameters=hyperparameters(body),
    )
    job = await quick_call(SERVICE, ctx.clients.finetune.CreateJob, request, metadata)
    return job_object(job)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(ctx: Ctx, metadata: Auth, after: str | None = None, limit: int = 20):
    limit = _page_size(limit)
    request = pb.ListJobsRequest(limit=1000)
    reply = await quick_call(SERVICE, ctx.clients.finetune.ListJobs, request, metadata)
    jobs = list(reply.jobs)
    if after:
        ids = [j.id for j in jobs]
        jobs = jobs[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": [job_object(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


def _page_size(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise invalid(f"limit must be in [1, {MAX_PAGE}], got {limit}", "limit")
    return limit


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve(job_id: str, ctx: Ctx, metadata: Auth):
    request = pb.GetJobRequest(id=job_id)
    return job_object(await quick_call(SERVICE, ctx.clients.finetune.GetJob, request, metadata))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel(job_id: str, ctx: Ctx, metadata: Auth):
    request = pb.CancelJobRequest(id=job_id)
    return job_object(await quick_call(SERVICE, ctx.clients.finetune.CancelJob, request, metadata))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def events(job_id: str, ctx: Ctx, metadata: Auth, after: str | None = None, limit: int = 20):
    request = pb.ListJobEventsRequest(id=job_id, limit=_page_size(limit), before=after or "")
    page = await quick_call(SERVICE, ctx.clients.finetune.ListJobEvents, request, metadata)
    return {"object": "list", "data": [event_object(e) for e in page.events], "has_more": page.has_more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def checkpoints(job_id: str, ctx: Ctx, metadata: Auth, after: str | None = None, limit: int = 10):
    """The served checkpoint: a succeeded job's adapter (the resume checkpoints a job writes while it trains
    are deleted when it ends, and are not models)."""
    _page_size(limit)
    job = await quick_call(SERVICE, ctx.clients.finetune.GetJob, pb.GetJobRequest(id=job_id), metadata)
    found = [checkpoint_object(job)] if job.state == pb.JOB_STATE_SUCCEEDED and not after else []
    return {
        "object": "list",
        "data": found,
        "has_more": False,
        "first_id": found[0]["id"] if found else None,
        "last_id": found[-1]["id"] if found else None,
    }
