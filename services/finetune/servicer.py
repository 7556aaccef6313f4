"""gRPC servicer: translates `modelworks.finetune.v1` messages to `FineTuneAPI` calls and back.

Redis faults (unreachable, timed out) answer UNAVAILABLE from every RPC, translated in one place here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging

import redis

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from services.finetune.api import FineTuneAPI
from services.finetune.datasets import DatasetRecord
from services.finetune.events import EventFollower
from services.finetune.export.access import ExportAccess
from services.finetune.export.process import run_export
from services.finetune.export.store import ExportInfo, ExportStore
from services.finetune.hyperparams import Hyperparameters
from services.finetune.jobs import JobEvent, JobRecord, JobState
from shared.adapters import AdapterInfo
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FineTuneService"].full_name

KINDS = {pb.JOB_KIND_LLM: "llm", pb.JOB_KIND_DIFFUSION: "diffusion"}
KIND_ENUMS = {v: k for k, v in KINDS.items()}
STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
STATES_BY_ENUM = {v: k for k, v in STATES.items()}
READ_CHUNK_BYTES = 1 << 20
MESSAGE_OVERHEAD_BYTES = 64  # a ReadDatasetResponse's field tag and length, with room to spare


def read_chunk_bytes(max_message_bytes: int) -> int:
    """ReadDataset's chunk size: 1 MiB, or less when `finetune.max_message_bytes` would not fit it."""
    return min(READ_CHUNK_BYTES, max_message_bytes - MESSAGE_OVERHEAD_BYTES)


def hyperparameters_from_proto(message: pb.Hyperparameters) -> Hyperparameters:
    values = {}
    for field in Hyperparameters.__dataclass_fields__:
        if field in ("seed", "validation_fraction", "aspect_buckets"):  # optional: unset is the default, 0 means 0
            values[field] = getattr(message, field) if message.HasField(field) else None
        elif field == "target_modules":
            values[field] = tuple(message.target_modules)
        else:
            values[field] = getattr(message, field)
    return Hyperparameters(**values)


def hyperparameters_to_proto(values: dict) -> pb.Hyperparameters:
    message = pb.Hyperparameters()
    for name, value in values.items():
        if name == "target_modules":
            message.target_modules.extend(value)
        elif value is not None and name in pb.Hyperparameters.DESCRIPTOR.fields_by_name:
            setattr(message, name, value)
    return message


def job_to_proto(job: JobRecord) -> pb.Job:
    return pb.Job(
        id=job.id,
        kind=KIND_ENUMS[job.kind],
        state=STATES[job.state],
        base_model=job.base_model,
        dataset_id=job.dataset_id,
        validation_dataset_id=job.validation_dataset_id,
        adapter_name=job.adapter_name,
        hyperparameters=hyperparameters_to_proto(job.hyperparameters),
        step=job.step,
        total_steps=job.total_steps,
        train_loss=job.train_loss,
        val_loss=job.val_loss,
        test_loss=job.test_loss,
        test_perplexity=job.test_perplexity,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempt=job.attempt,
        worker=job.worker,
        eta_seconds=job.eta_seconds,
        learning_rate=job.learning_rate,
        throughput=job.throughput,
        resumed_from_step=job.resumed_from_step,
        skipped_steps=job.skipped_steps,
        owner=job.owner,
    )


def event_to_proto(job_id: str, event: JobEvent) -> pb.JobEvent:
    state = STATES.get(JobState(event.state), pb.JOB_STATE_UNSPECIFIED) if event.state else pb.JOB_STATE_UNSPECIFIED
    return pb.JobEvent(
        job_id=job_id,
        state=state,
        step=event.step,
        total_steps=event.total_steps,
        train_loss=event.train_loss,
        val_loss=event.val_loss,
        test_loss=event.test_loss,
        test_perplexity=event.test_perplexity,
        message=event.message,
        time=event.time,
        type=event.type,
        learning_rate=event.learning_rate,
        throughput=event.throughput,
        eta_seconds=event.eta_seconds,
        event_id=event.id,
    )


def dataset_to_proto(record: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        id=record.id,
        name=record.name,
        format=record.format,
        num_records=record.num_records,
        size_bytes=record.size_bytes,
        created_at=record.created_at,
        record_type=record.record_type,
        bundled=record.bundled,
        owner=record.owner,
    )


def adapter_to_proto(info: AdapterInfo) -> pb.Adapter:
    return pb.Adapter(
        name=info.name,
        kind=KIND_ENUMS.get(info.kind, pb.JOB_KIND_UNSPECIFIED),
        base_model=info.base_model,
        job_id=info.job_id,
        method=info.method,
        created_at=info.created_at,
        metrics={k: float(v) for k, v in info.metrics.items() if isinstance(v, int | float)},
        version=info.version,
        owner=info.owner,
        quantization=info.quantization,
        imported_format=info.imported_format,
    )


REDIS_FAULTS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _store_unreachable(exc: Exception) -> Unavailable:
    log.warning("the job store (Redis) is unreachable", extra={"error": repr(exc)})
    return Unavailable("the job store (Redis) is unreachable; retry later")


def _redis_faults_unavailable(method):
    """Wrap one RPC method (unary or streaming) so a Redis fault answers UNAVAILABLE, not INTERNAL."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except REDIS_FAULTS as exc:
                raise _store_unreachable(exc) from exc

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except REDIS_FAULTS as exc:
            raise _store_unreachable(exc) from exc

    return unary


def _every_rpc_redis_faults_unavailable(cls):
    for rpc in pb.DESCRIPTOR.services_by_name["FineTuneService"].methods:
        setattr(cls, rpc.name, _redis_faults_unavailable(getattr(cls, rpc.name)))
    return cls


@contextlib.asynccontextmanager
async def _staged(request_iterator, begin, message: str, info_fields: str):
    """A client stream of `info` then chunks, written into the upload `begin(info)` makes: yields (upload, info)
    once the stream ends; the staged file is removed unless the body moved it into place."""
    upload, info = None, None
    try:
        async for part in request_iterator:
            which = part.WhichOneof("data")
            if upload is None:
                if which != "info":
                    raise InvalidArgument(f"the first {message} must carry `info` ({info_fields})")
                info = part.info
                upload = await asyncio.to_thread(begin, info)
            elif which == "chunk":
                await asyncio.to_thread(upload.write, part.chunk)  # disk writes stay off the event loop
            else:
                raise InvalidArgument(f"only the first {message} may carry `info`; send chunks after it")
        if upload is None:
            raise InvalidArgument(f"the stream was empty: send `info` ({info_fields}), then the file in chunks")
        yield upload, info
    finally:
        if upload is not None:
            upload.discard()


@_every_rpc_redis_faults_unavailable
class FineTuneServicer(finetune_pb2_grpc.FineTuneServiceServicer):
    def __init__(self, api: FineTuneAPI, watchers: EventFollower):
        self.api = api
        self.watchers = watchers
        self.chunk_bytes = read_chunk_bytes(api.settings.finetune.max_message_bytes)
        self.exports = ExportAccess(api.adapters, ExportStore(api.settings.exports_dir), api.jobs)
        self._export_slots = asyncio.Semaphore(api.settings.finetune.max_concurrent_exports)

    async def UploadDataset(self, request_iterator, context):
        def begin(info):
            return self.api.datasets.begin(info.name, info.format)

        async with _staged(request_iterator, begin, "UploadDatasetRequest", "name and format") as (upload, _):
            return dataset_to_proto(await asyncio.to_thread(self.api.accept_upload, upload))

    async def ImportAdapter(self, request_iterator, context):
        def begin(info):
            return self.api.begin_import(info.name, info.base_model)

        async with _staged(request_iterator, begin, "ImportAdapterRequest", "name and base_model") as (upload, info):
            adapter = await asyncio.to_thread(self.api.import_adapter, upload, info.name, info.base_model)
            return adapter_to_proto(adapter)

    async def ListDatasets(self, request, context):
        records = await asyncio.to_thread(self.api.list_datasets)
        return pb.ListDatasetsResponse(datasets=[dataset_to_proto(r) for r in records])

    async def GetDataset(self, request, context):
        return dataset_to_proto(await asyncio.to_thread(self.api.get_dataset, request.id))

    async def ReadDataset(self, request, context):
        file = await asyncio.to_thread(self.api.open_dataset, request.id)  # NOT_FOUND before the stream starts
        try:
            while chunk := await asyncio.to_thread(file.read, self.chunk_bytes):  # one chunk in memory at a time
                yield pb.ReadDatasetResponse(chunk=chunk)
        finally:
            file.close()

    async def CreateJob(self, request, context):
        job = await asyncio.to_thread(
            self.api.create_job,
            KINDS.get(request.kind, ""),
            request.base_model,
            request.dataset_id,
            request.adapter_name,
            hyperparameters_from_proto(request.hyperparameters),
            request.validation_dataset_id,
        )
        return job_to_proto(job)

    async def GetJob(self, request, context):
        return job_to_proto(await asyncio.to_thread(self.api.get_job, request.id))

    async def ListJobs(self, request, context):
        if request.state and request.state not in STATES_BY_ENUM:
            raise InvalidArgument(f"unknown job state {request.state}")
        state = STATES_BY_ENUM.get(request.state)
        jobs = await asyncio.to_thread(self.api.list_jobs, state, request.limit)
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs])

    async def CancelJob(self, request, context):
        return job_to_proto(await asyncio.to_thread(self.api.cancel_job, request.id))

    async def WatchJob(self, request, context):
        await asyncio.to_thread(self.api.get_job, request.id)  # NOT_FOUND before the stream starts
        async with contextlib.aclosing(self.watchers.follow(request.id)) as events:  # its slot freed at once
            async for event in events:
                yield event_to_proto(request.id, event)

    async def ListJobEvents(self, request, context):
        page = await asyncio.to_thread(
            self.api.list_job_events, request.id, request.limit, request.before, request.type
        )
        return pb.ListJobEventsResponse(
            events=[event_to_proto(request.id, e) for e in page.events], has_more=page.has_more
        )

    async def ListAdapters(self, request, context):
        if request.kind and request.kind not in KINDS:
            raise InvalidArgument(f"unknown job kind {request.kind}")
        adapters = await asyncio.to_thread(self.api.list_adapters, KINDS.get(request.kind))
        return pb.ListAdaptersResponse(adapters=[adapter_to_proto(a) for a in adapters])

    async def DeleteAdapter(self, request, context):
        await asyncio.to_thread(self.api.delete_adapter, request.name)
        return pb.DeleteAdapterResponse()

    async def DeleteDataset(self, request, context):
        await asyncio.to_thread(self.api.delete_dataset, request.id)
        return pb.DeleteDatasetResponse()

    async def ListBaseModels(self, request, context):
        models = await asyncio.to_thread(self.api.base_models)
        return pb.ListBaseModelsResponse(
            models=[
                pb.BaseModel(
                    name=m.name,
                    kind=KIND_ENUMS[m.kind],
                    methods=list(m.methods),
                    default_target_modules=list(m.default_target_modules),
                )
                for m in models
            ]
        )

    async def ExportAdapter(self, request, context):
        fmt = EXPORT_FORMATS.get(request.format)
        if fmt is None:
            raise InvalidArgument(f"unknown export format {request.format}")
        arguments = await asyncio.to_thread(
            self.exports.export_arguments,
            request.adapter,
            request.job_id,
            fmt,
            request.gguf_type,
            request.dtype,
            request.name,
        )
        if self._export_slots.locked():
            raise ResourceExhausted(
                "another export is running (finetune.max_concurrent_exports); retry when it finishes"
            )
        async with self._export_slots:
            written = await run_export(arguments, self.api.settings.finetune.export_timeout_s)
        return export_to_proto(await asyncio.to_thread(self.exports.get, written["name"]))

    async def ListExports(self, request, context):
        exports = await asyncio.to_thread(self.exports.list)
        return pb.ListExportsResponse(exports=[export_to_proto(e) for e in exports])

    async def ReadExport(self, request, context):
        file = await asyncio.to_thread(self.exports.open_file, request.name, request.path)
        try:
            while chunk := await asyncio.to_thread(file.read, self.chunk_bytes):
                yield pb.ReadExportResponse(chunk=chunk)
        finally:
            file.close()

    async def DeleteExport(self, request, context):
        await asyncio.to_thread(self.exports.delete, request.name)
        return pb.DeleteExportResponse()


EXPORT_FORMATS = {
    pb.EXPORT_FORMAT_UNSPECIFIED: "merged",
    pb.EXPORT_FORMAT_MERGED: "merged",
    pb.EXPORT_FORMAT_GGUF: "gguf",
}


def export_to_proto(info: ExportInfo) -> pb.Export:
    return pb.Export(
        name=info.name,
        adapter=info.adapter,
        base_model=info.base_model,
        format=pb.EXPORT_FORMAT_GGUF if info.format == "gguf" else pb.EXPORT_FORMAT_MERGED,
        dtype=info.dtype,
        gguf_type=info.gguf_type,
        created_at=info.created_at,
        owner=info.owner,
        files=[pb.ExportFile(path=path, bytes=size) for path, size in sorted(info.files.items())],
        total_bytes=info.total_bytes,
    )
