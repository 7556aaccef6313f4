"""What the fine-tune API does, without gRPC: validate, store, enqueue, report. Never trains, never imports torch.

Everything a worker could trip over is checked here, before a job queues: the base model and its kind,
the dataset and its record type, the adapter name (free in the store and among unfinished jobs), and
every hyperparameter against the model's architecture and the data.

Ownership: jobs, datasets and adapters carry the name of the API key that made them. A key without the
admin scope sees only its own (and the bundled, ownerless samples); another key's job or dataset is
NOT_FOUND to it, so it cannot learn that one exists. Changing or deleting needs the owner or an admin.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import BinaryIO

from celery import Celery

from services.finetune import hyperparams, metrics
from services.finetune.adapter_import import LORA_WEIGHTS, AdapterImport, lora_format, tensor_names
from services.finetune.datasets import DatasetRecord, DatasetStore, DatasetUpload
from services.finetune.hyperparams import Hyperparameters, TrainingData
from services.finetune.jobs import EVENT_TYPES, AdapterNameTaken, EventPage, JobRecord, JobState, JobStore
from services.finetune.queue import dispatch
from shared.adapters import AdapterInfo, AdapterStore, validate_adapter_name
from shared.auth import Caller, current_caller
from shared.diffusion_families import family_of_class
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shared.locations import TRAINING_DEFAULTS_FILE, prepared_folder, read_json
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)

DAY_S = 86_400.0
DEFAULT_EVENTS_PAGE = 20  # OpenAI's default for a fine-tuning job's events
MAX_EVENTS_PAGE = 1000


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    kind: str
    methods: tuple[str, ...]
    default_target_modules: tuple[str, ...]


def _llm_profile(folder) -> dict:
    config = read_json(folder, "config.json")
    tokenizer_config = read_json(folder, "tokenizer_config.json")
    context = config.get("max_position_embeddings") or 0
    tokenizer_max = tokenizer_config.get("model_max_length")
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:
        context = min(context, tokenizer_max) if context else tokenizer_max
    has_template = bool(tokenizer_config.get("chat_template")) or (folder / "chat_template.jinja").is_file()
    architecture = config.get("model_type", "unknown")
    targets = hyperparams.LLM_TARGETS.get(architecture, hyperparams.ANY_ARCHITECTURE)
    return dict(architecture=architecture, context_length=context, has_chat_template=has_template, targets=targets)


TRAINABLE_FAMILIES = ("sd", "sdxl", "sd3", "flux")


class UntrainableBase(FailedPrecondition):
    """A diffusion base of a family no recipe trains yet: not offered, and refused by name."""


def _diffusion_profile(folder, entry: ModelEntry | None = None) -> dict:
    pipeline_class = read_json(folder, "model_index.json").get("_class_name", "")
    family = family_of_class(pipeline_class)
    if family is None or family.name not in TRAINABLE_FAMILIES:
        name = family.name if family else pipeline_class
        raise UntrainableBase(
            f"LoRA training takes {', '.join(TRAINABLE_FAMILIES)} bases; this one is {name} "
            "(its adapters are served once trained elsewhere)"
        )
    vae = read_json(folder / "vae", "config.json")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    denoiser = read_json(folder / ("unet" if (folder / "unet").is_dir() else "transformer"), "config.json")
    native = int(denoiser.get("sample_size", 128)) * scale  # Flux's transformer has none: 1024 px
    defaults = entry.diffusion if entry is not None else None
    if defaults is not None and defaults.width and defaults.height:  # the size this server serves it at
        native = min(defaults.width, defaults.height)
    return dict(
        architecture="unet" if family.name in ("sd", "sdxl") else "transformer",
        native_resolution=native,
        family=family.name,
        targets=hyperparams.DIFFUSION_TARGETS[family.name],
        # pixels a latent patch side: Flux packs 2x2 latents, SD3 has its patch size
        size_multiple=max(8, scale * (2 if family.name == "flux" else int(denoiser.get("patch_size") or 1))),
        guidance_embeds=bool(denoiser.get("guidance_embeds", False)),
    )


class FineTuneAPI:
    def __init__(self, settings: Settings, jobs: JobStore, datasets: DatasetStore, celery: Celery):
        self.settings = settings
        self.jobs = jobs
        self.datasets = datasets
        self.adapters = AdapterStore(settings.adapters_dir)
        self.celery = celery
        self._llms = ModelRegistry(settings.models, "llm")
        self._diffusion = ModelRegistry(settings.models, "diffusion")

    # -- models -----------------------------------------------------------------------------------------

    def base_models(self) -> list[BaseModelInfo]:
        out = []
        for entry in [*self._llms.entries(), *self._diffusion.entries()]:
            methods = hyperparams.LLM_METHODS if entry.kind == "llm" else hyperparams.DIFFUSION_METHODS
            try:
                profile = self._profile(entry)
                defaults = tuple(profile["targets"][0]) if "targets" in profile else tuple(hyperparams.UNET_TARGETS[0])
            except UntrainableBase:
                continue
            except Exception:  # not prepared yet: still listed, without architecture details
                defaults = ()
            out.append(BaseModelInfo(entry.name, entry.kind, methods, defaults))
        return out

    def _base_model(self, kind: str, name: str) -> ModelEntry:
        if kind not in ("llm", "diffusion"):
            raise InvalidArgument("kind must be JOB_KIND_LLM or JOB_KIND_DIFFUSION")
        if not name:
            raise InvalidArgument("base_model is required; ListBaseModels names the ones this server trains")
        trainable = [e for e in self.settings.models if e.kind in ("llm", "diffusion")]
        entry = next((e for e in self.settings.models if e.name == name), None)
        if entry is None:
            known = ", ".join(e.name for e in trainable)
            raise NotFound(f"base model {name!r} not found; configured models: {known}")
        if entry not in trainable:
            raise InvalidArgument(f"base model {name!r} is an {entry.kind} model; jobs train llm and diffusion models")
        if entry.kind != kind:
            raise InvalidArgument(f"base model {name!r} is a {entry.kind} model, not a {kind} model")
        return entry

    def _profile(self, entry: ModelEntry) -> dict:
        folder = prepared_folder(entry, self.settings)
        profile = _llm_profile(folder) if entry.kind == "llm" else _diffusion_profile(folder, entry)
        return profile | {"model_defaults": read_json(folder, TRAINING_DEFAULTS_FILE)}

    def _cuda_workers(self) -> bool | None:
        workers = self.jobs.workers()
        return any(w.get("cuda") for w in workers) if workers else None

    # -- jobs -------------------------------------------------------------------------------------------

    def create_job(
        self,
        kind: str,
        base_model: str,
        dataset_id: str,
        adapter_name: str,
        hp: Hyperparameters,
        validation_dataset_id: str = "",
    ) -> JobRecord:
        caller = current_caller()
        entry = self._base_model(kind, base_model)
        if not dataset_id:
            raise InvalidArgument("dataset_id is required; UploadDataset returns one")
        dataset = self._visible_dataset(dataset_id, caller)
        if dataset.kind != kind:
            raise InvalidArgument(
                f"dataset {dataset_id!r} is {dataset.format} ({dataset.kind} data); a {kind} job needs "
                f"{'jsonl' if kind == 'llm' else 'imagefolder_zip'}"
            )
        validation = self._validation_dataset(validation_dataset_id, dataset, caller)
        if not adapter_name:
            raise InvalidArgument("adapter_name is required: the name the trained adapter is served by")
        validate_adapter_name(adapter_name)
        if (self.adapters.root / adapter_name).exists():
            raise AlreadyExists(f"adapter {adapter_name!r} already exists; choose another name or delete it first")
        resolved, total_steps = hyperparams.resolve(hp, self._training_data(entry, dataset, validation))
        if kind == "diffusion":
            self.datasets.check_training_budget(dataset, resolved.resolution)
        record = JobRecord(
            id=self.jobs.new_id(),
            kind=kind,
            base_model=entry.name,
            dataset_id=dataset.id,
            validation_dataset_id=validation.id if validation else "",
            adapter_name=adapter_name,
            hyperparameters=resolved.to_dict(),
            total_steps=total_steps,
            owner=caller.name,
        )
        self._store_within_quota(record, caller)
        try:
            dispatch(self.celery, self.settings.finetune.queue, self.jobs, record.id, record.attempt)
        except Exception as exc:
            log.warning("could not enqueue a job", extra={"job": record.id, "error": repr(exc)})
            self.jobs.delete(record.id)
            raise Unavailable(
                "the job queue (Redis) cannot be reached; the job was not created, retry shortly"
            ) from exc
        log.info("job created", extra={"job": record.id, "kind": kind, "base_model": entry.name, "steps": total_steps})
        return record

    def _validation_dataset(
        self, validation_dataset_id: str, dataset: DatasetRecord, caller: Caller
    ) -> DatasetRecord | None:
        """The dataset a job validates on instead of a split of its training data (OpenAI's validation_file):
        visible to the caller, and records like the training ones, so they are encoded and scored alike."""
        if not validation_dataset_id:
            return None
        if dataset.kind == "diffusion":
            raise InvalidArgument(
                "validation_dataset_id applies to LLM jobs only; diffusion jobs hold out validation_fraction of "
                "their zip"
            )
        validation = self._visible_dataset(validation_dataset_id, caller)
        if (validation.format, validation.record_type) != (dataset.format, dataset.record_type):
            raise InvalidArgument(
                f"validation dataset {validation_dataset_id!r} holds {validation.format} {validation.record_type} "
                f"records; the training dataset {dataset.id!r} holds {dataset.format} {dataset.record_type} "
                "records, and both must be alike"
            )
        return validation

    def _training_data(
        self, entry: ModelEntry, dataset: DatasetRecord, validation: DatasetRecord | None = None
    ) -> TrainingData:
        llm = self.settings.llm
        return TrainingData(
            kind=entry.kind,
            num_records=dataset.num_records,
            record_type=dataset.record_type,
            validation_records=validation.num_records if validation else 0,
            cuda_workers=self._cuda_workers(),
            max_steps_limit=self.settings.finetune.max_steps_limit,
            devices=self.settings.finetune.devices,
            max_lora_rank=llm.max_lora_rank if entry.kind == "llm" else hyperparams.MAX_LORA_RANK,
            allow_embedding_targets=llm.allow_embedding_lora_targets,
            **self._profile(entry),
        )

    def _store_within_quota(self, record: JobRecord, caller: Caller) -> None:
        """Store the job unless its key already has its quota of unfinished jobs (RESOURCE_EXHAUSTED) or an
        unfinished job holds its adapter name (ALREADY_EXISTS, naming that job only to a key that may see it)."""
        if caller.max_queued_jobs is not None:
            limit, setting = caller.max_queued_jobs, f"max_queued_jobs of the API key {caller.name!r}"
        else:
            limit, setting = self.settings.finetune.max_queued_jobs, "finetune.max_queued_jobs"
        try:
            self.jobs.create(record, max_active=limit, limit_setting=setting)
        except AdapterNameTaken as taken:
            if not self._sees_job(caller, taken.holder):
                raise taken.hidden() from None
            raise

    def _sees_job(self, caller: Caller, job_id: str) -> bool:
        try:
            return caller.sees(self.jobs.get(job_id).owner)
        except NotFound:  # ended and expired meanwhile
            return False

    def get_job(self, job_id: str) -> JobRecord:
        """The job, if the caller may see it; another key's job is NOT_FOUND, as an unknown one is."""
        job = self.jobs.get(job_id)
        if not current_caller().sees(job.owner):
            raise NotFound(f"job {job_id!r} not found")
        return job

    def list_jobs(self, state: JobState | None, limit: int) -> list[JobRecord]:
        caller = current_caller()
        return self.jobs.list(state, min(limit or 100, 1000), owner=None if caller.is_admin else caller.name)

    def list_job_events(self, job_id: str, limit: int, before: str, event_type: str) -> EventPage:
        """A page of a visible job's stored events, newest first; `before` is the last event id of the
        previous page."""
        if limit > MAX_EVENTS_PAGE:
            raise InvalidArgument(f"limit must be at most {MAX_EVENTS_PAGE}, got {limit}; page with `before`")
        if event_type and event_type not in EVENT_TYPES:
            raise InvalidArgument(f"unknown event type {event_type!r}; use one of {', '.join(EVENT_TYPES)}")
        self.get_job(job_id)
        return self.jobs.events_newest_first(job_id, limit or DEFAULT_EVENTS_PAGE, before, event_type)

    def cancel_job(self, job_id: str) -> JobRecord:
        self.get_job(job_id)
        return self.jobs.cancel(job_id)

    def expire_finished_jobs(self, now: float | None = None) -> list[str]:
        """Remove the jobs that ended `finetune.job_retention_days` ago or more, with their folders."""
        cutoff = (time.time() if now is None else now) - self.settings.finetune.job_retention_days * DAY_S
        expired = self.jobs.expire_finished(cutoff)
        for job_id in expired:
            shutil.rmtree(self.settings.jobs_dir / job_id, ignore_errors=True)
        if expired:
            metrics.EXPIRED.inc(len(expired))
            log.info("expired finished jobs", extra={"jobs": len(expired)})
        return expired

    # -- datasets and adapters ----------------------------------------------------------------------------

    def _visible_dataset(self, dataset_id: str, caller: Caller) -> DatasetRecord:
        dataset = self.datasets.get(dataset_id)
        if not caller.sees_shared(dataset.owner):
            raise NotFound(f"dataset {dataset_id!r} not found")
        return dataset

    def accept_upload(self, upload: DatasetUpload) -> DatasetRecord:
        """Validate and store an upload as the caller's dataset."""
        return self.datasets.accept(upload, owner=current_caller().name)

    def get_dataset(self, dataset_id: str) -> DatasetRecord:
        return self._visible_dataset(dataset_id, current_caller())

    def open_dataset(self, dataset_id: str) -> BinaryIO:
        """A visible dataset's file, opened here so an unknown id is NOT_FOUND before any byte is sent."""
        return self.datasets.open_data(self._visible_dataset(dataset_id, current_caller()))

    def list_datasets(self) -> list[DatasetRecord]:
        caller = current_caller()
        return [d for d in self.datasets.list() if caller.sees_shared(d.owner)]

    def delete_dataset(self, dataset_id: str) -> None:
        """The owner or an admin; the bundled samples (no owner) only an admin. Not while a job needs it."""
        caller = current_caller()
        dataset = self._visible_dataset(dataset_id, caller)
        caller.require_owner(dataset.owner, f"dataset {dataset_id!r}")
        if users := self.jobs.unfinished_using(dataset_id):
            shown = [job_id for job_id in users if self._sees_job(caller, job_id)]
            named = f" ({', '.join(shown)})" if shown else ""
            raise FailedPrecondition(
                f"dataset {dataset_id!r} is used by {len(users)} unfinished job(s){named}; cancel them or let them "
                "end first"
            )
        self.datasets.delete(dataset_id)

    def list_adapters(self, kind: str | None) -> list[AdapterInfo]:
        caller = current_caller()
        return [a for a in self.adapters.list() if (kind is None or a.kind == kind) and caller.sees_shared(a.owner)]

    def begin_import(self, name: str, base_model: str) -> AdapterImport:
        """Checked before a byte is sent: a free name and a diffusion base model this server serves."""
        self._check_import_target(name, base_model)
        return AdapterImport(self.settings.data_dir / "imports", self.settings.finetune.max_adapter_import_bytes)

    def import_adapter(self, upload: AdapterImport, name: str, base_model: str) -> AdapterInfo:
        """Check the whole file's keys, then save it into the store (the staging folder is gone either way)."""
        upload.close()
        key_format = lora_format(tensor_names(upload.path))
        entry = self._check_import_target(name, base_model)
        info = AdapterInfo(
            name=name, kind="diffusion", base_model=entry.name, created_at=time.time(),
            owner=current_caller().name, imported_format=key_format,
        )  # fmt: skip
        self.adapters.save(info, lambda folder: shutil.move(upload.path, folder / LORA_WEIGHTS))
        log.info("adapter imported", extra={"adapter": name, "base_model": entry.name, "format": key_format})
        return self.adapters.get(name)

    def _check_import_target(self, name: str, base_model: str) -> ModelEntry:
        validate_adapter_name(name)
        if not base_model:
            raise InvalidArgument("base_model is required: the diffusion model the LoRA was made for")
        entry = next((e for e in self._diffusion.entries() if e.name == base_model), None)
        if entry is None:
            known = ", ".join(e.name for e in self._diffusion.entries())
            raise NotFound(f"diffusion model {base_model!r} not found; LoRA files import for: {known}")
        if (self.adapters.root / name).exists():
            raise AlreadyExists(f"adapter {name!r} already exists; choose another name or delete it first")
        return entry

    def delete_adapter(self, name: str) -> None:
        """The owner or an admin; an adapter with no owner (placed by an operator) only an admin."""
        caller = current_caller()
        owner = self._adapter_owner(validate_adapter_name(name))
        if not caller.sees_shared(owner):
            raise NotFound(f"adapter {name!r} not found in the adapter store")
        caller.require_owner(owner, f"adapter {name!r}")
        self.adapters.delete(name)

    def _adapter_owner(self, name: str) -> str:
        try:
            return self.adapters.get(name).owner
        except FailedPrecondition:  # unreadable metadata, so no known owner: an admin may still remove it
            return ""
