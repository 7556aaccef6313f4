"""What the fine-tune API does, without gRPC: validate, store, enqueue, report. Never trains, never imports torch.

Everything a worker could trip over is checked here, before a job queues: the base model and its kind,
the dataset and its record type, the adapter name (free in the store and among unfinished jobs), and
every hyperparameter against the model's architecture and the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Celery

from services.finetune import hyperparams
from services.finetune.datasets import DatasetRecord, DatasetStore
from services.finetune.hyperparams import Hyperparameters, TrainingData
from services.finetune.jobs import JobRecord, JobState, JobStore
from services.finetune.queue import dispatch
from shared.adapters import AdapterInfo, AdapterStore, validate_adapter_name
from shared.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from shared.locations import TRAINING_DEFAULTS_FILE, prepared_folder, read_json
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)


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


def _diffusion_profile(folder) -> dict:
    unet = read_json(folder / "unet", "config.json")
    vae = read_json(folder / "vae", "config.json")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return dict(architecture="unet", native_resolution=int(unet.get("sample_size", 64)) * scale)


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
            except Exception:  # not prepared yet: still listed, without architecture details
                defaults = ()
            out.append(BaseModelInfo(entry.name, entry.kind, methods, defaults))
        return out

    def _base_model(self, kind: str, name: str) -> ModelEntry:
        if kind not in ("llm", "diffusion"):
            raise InvalidArgument("kind must be JOB_KIND_LLM or JOB_KIND_DIFFUSION")
        if not name:
            raise InvalidArgument("base_model is required; ListBaseModels names the ones this server trains")
        entry = next((e for e in self.settings.models if e.name == name), None)
        if entry is None:
            known = ", ".join(e.name for e in self.settings.models)
            raise NotFound(f"base model {name!r} not found; configured models: {known}")
        if entry.kind != kind:
            raise InvalidArgument(f"base model {name!r} is a {entry.kind} model, not a {kind} model")
        return entry

    def _profile(self, entry: ModelEntry) -> dict:
        folder = prepared_folder(entry, self.settings)
        profile = _llm_profile(folder) if entry.kind == "llm" else _diffusion_profile(folder)
        return profile | {"model_defaults": read_json(folder, TRAINING_DEFAULTS_FILE)}

    def _cuda_workers(self) -> bool | None:
        workers = self.jobs.workers()
        return any(w.get("cuda") for w in workers) if workers else None

    # -- jobs -------------------------------------------------------------------------------------------

    def create_job(
        self, kind: str, base_model: str, dataset_id: str, adapter_name: str, hp: Hyperparameters
    ) -> JobRecord:
        entry = self._base_model(kind, base_model)
        if not dataset_id:
            raise InvalidArgument("dataset_id is required; UploadDataset returns one")
        dataset = self.datasets.get(dataset_id)
        if dataset.kind != kind:
            raise InvalidArgument(
                f"dataset {dataset_id!r} is {dataset.format} ({dataset.kind} data); a {kind} job needs "
                f"{'jsonl' if kind == 'llm' else 'imagefolder_zip'}"
            )
        if not adapter_name:
            raise InvalidArgument("adapter_name is required: the name the trained adapter is served by")
        validate_adapter_name(adapter_name)
        if (self.adapters.root / adapter_name).exists():
            raise AlreadyExists(f"adapter {adapter_name!r} already exists; choose another name or delete it first")
        data = TrainingData(
            kind=kind,
            num_records=dataset.num_records,
            record_type=dataset.record_type,
            cuda_workers=self._cuda_workers(),
            max_steps_limit=self.settings.finetune.max_steps_limit,
            devices=self.settings.finetune.devices,
            **self._profile(entry),
        )
        resolved, total_steps = hyperparams.resolve(hp, data)
        record = JobRecord(
            id=self.jobs.new_id(),
            kind=kind,
            base_model=entry.name,
            dataset_id=dataset.id,
            adapter_name=adapter_name,
            hyperparameters=resolved.to_dict(),
            total_steps=total_steps,
        )
        self.jobs.create(record)
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

    def get_job(self, job_id: str) -> JobRecord:
        return self.jobs.get(job_id)

    def list_jobs(self, state: JobState | None, limit: int) -> list[JobRecord]:
        return self.jobs.list(state, min(limit or 100, 1000))

    def cancel_job(self, job_id: str) -> JobRecord:
        return self.jobs.cancel(job_id)

    # -- datasets and adapters ----------------------------------------------------------------------------

    def list_datasets(self) -> list[DatasetRecord]:
        return self.datasets.list()

    def list_adapters(self, kind: str | None) -> list[AdapterInfo]:
        return [a for a in self.adapters.list() if kind is None or a.kind == kind]

    def delete_adapter(self, name: str) -> None:
        self.adapters.delete(validate_adapter_name(name))
