"""Launching one attempt's training: the job as the training side sees it, and where its recipe runs.

`spec_for` resolves what a job names (the base model's entry, the dataset's file) once, on the worker;
the spec carries the results to every rank, and each rank builds its recipe context from it once.
A recipe runs in the worker's own process, or under DDP across the worker's devices: rank 0 runs in
the worker process itself (it holds the job's hooks: Redis, the lease, the stop flags) and ranks
1..N-1 are spawned processes (spawn, never fork: CUDA does not survive a fork). The same recipe and
training loop run on every rank; NCCL on GPUs, gloo on CPUs. Rank 0 decides when to stop and writes
the adapter.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.finetune.datasets import DatasetStore
from services.finetune.hyperparams import Hyperparameters
from services.finetune.training.errors import TrainingInputError
from services.finetune.training.loop import TrainingHooks, TrainingResult, TrainingStopped
from services.finetune.training.recipe import RecipeContext, load_recipe
from shared.errors import NotFound
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class TrainingSpec:
    """A job as the training side sees it, resolved once (picklable: DDP ranks get it)."""

    job_id: str
    kind: str
    base_model: ModelEntry
    dataset_path: Path
    hyperparameters: Hyperparameters
    total_steps: int
    job_dir: Path  # checkpoints, TensorBoard events, profiler traces
    attempt: int = 1  # this attempt's checkpoints go to their own folder
    validation_dataset_path: Path | None = None  # None: validate on a split of the training dataset

    def context(self, settings: Settings, hooks: TrainingHooks | None, device: torch.device) -> RecipeContext:
        context = RecipeContext(
            job_id=self.job_id,
            base_model=self.base_model,
            dataset_path=self.dataset_path,
            hyperparameters=self.hyperparameters,
            total_steps=self.total_steps,
            settings=settings,
            device=device,
            job_dir=self.job_dir,
            hooks=hooks,
            attempt=self.attempt,
            validation_dataset_path=self.validation_dataset_path,
        )
        log.info(
            "training precision",
            extra={"job": self.job_id, "device": str(device), "mixed_precision": context.mixed_precision},
        )
        return context


def spec_for(job, attempt: int, settings: Settings) -> TrainingSpec:
    """The spec of attempt `attempt` of `job` (a JobRecord): its base model and datasets looked up here, once."""
    try:
        entry = ModelRegistry(settings.models, job.kind).get(job.base_model)
    except NotFound:
        raise TrainingInputError(f"base model {job.base_model!r} is not configured on this worker") from None
    datasets = DatasetStore(settings.datasets_dir, settings.finetune)
    validation_id = job.validation_dataset_id
    return TrainingSpec(
        job_id=job.id,
        kind=job.kind,
        base_model=entry,
        dataset_path=_data_path(datasets, job.dataset_id, "dataset"),
        hyperparameters=Hyperparameters.from_dict(job.hyperparameters),
        total_steps=job.total_steps,
        job_dir=settings.jobs_dir / job.id,
        attempt=attempt,
        validation_dataset_path=_data_path(datasets, validation_id, "validation dataset") if validation_id else None,
    )


def _data_path(datasets: DatasetStore, dataset_id: str, role: str) -> Path:
    try:
        return datasets.data_path(datasets.get(dataset_id))
    except NotFound:  # deleted after the job was queued
        raise TrainingInputError(f"{role} {dataset_id!r} no longer exists") from None


def train(spec: TrainingSpec, settings: Settings, hooks: TrainingHooks) -> tuple[TrainingResult, Path]:
    """Set the recipe up, train (resuming from a checkpoint if any), write the adapter into `job_dir/adapter`."""
    from shared.devices import resolve_device

    spec.job_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = spec.job_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    devices = settings.finetune.devices
    if devices > 1:
        result = train_distributed(spec, settings, hooks, adapter_dir, devices)
    else:
        result = train_here(spec, settings, hooks, adapter_dir, resolve_device("auto"))
    return result, adapter_dir


def _stop_if_asked(hooks: TrainingHooks | None) -> None:
    """Setup (model load, preprocessing) takes long enough that a cancel or a shutdown must be heard around it."""
    reason = hooks.stop_requested() if hooks is not None else None
    if reason is not None:
        raise TrainingStopped(reason, 0)


def train_here(spec: TrainingSpec, settings: Settings, hooks, adapter_dir: Path | None, device) -> TrainingResult:
    """Set up, train and (with `adapter_dir`) save the adapter, in this process."""
    _stop_if_asked(hooks)
    recipe = load_recipe(spec.kind)(spec.context(settings, hooks, device))
    try:
        recipe.setup()
        _stop_if_asked(hooks)
        result = recipe.train()
        if adapter_dir is not None:
            adapter_dir.mkdir(parents=True, exist_ok=True)
            recipe.save(adapter_dir)
        return result
    finally:
        recipe.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _join(rank: int, world_size: int, port: int) -> torch.device:
    device = _rank_device(rank)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return device


def _rank_main(spec: TrainingSpec, settings: Settings, rank: int, world_size: int, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    device = _join(rank, world_size, port)
    try:
        train_here(spec, settings, None, None, device)
    finally:
        dist.destroy_process_group()


def train_distributed(spec: TrainingSpec, settings: Settings, hooks, adapter_dir: Path, world_size: int):
    """DDP over `world_size` ranks; this process is rank 0. Raises what rank 0 raises (a stop, a failure)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(f"finetune.devices is {world_size} but this worker sees {torch.cuda.device_count()} GPUs")
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    spawn = mp.get_context("spawn")
    ranks = [
        spawn.Process(target=_rank_main, args=(spec, settings, rank, world_size, port, threads), name=f"rank-{rank}")
        for rank in range(1, world_size)
    ]
    for process in ranks:
        process.start()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = _join(0, world_size, port)
        try:
            result = train_here(spec, settings, hooks, adapter_dir, device)
        finally:
            dist.destroy_process_group()
    finally:
        torch.set_num_threads(previous_threads)
        _reap(ranks)
    failed = [p.name for p in ranks if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"DDP ranks {', '.join(failed)} failed; the worker's log has their errors")
    return result


def _reap(ranks: list) -> None:
    for process in ranks:
        process.join(60)
        if process.is_alive():
            process.terminate()
            process.join()
