"""Where a job's recipe runs: in the worker's own process, or under DDP across the worker's devices.

Under DDP, rank 0 runs in the worker process itself (it holds the job's hooks: Redis, the lease, the
stop flags) and ranks 1..N-1 are spawned processes (spawn, never fork: CUDA does not survive a fork).
The same recipe and training loop run on every rank; NCCL on GPUs, gloo on CPUs. Rank 0 decides when to
stop and writes the adapter.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.finetune.training.loop import TrainingHooks, TrainingResult
from services.finetune.training.recipe import RecipeContext, load_recipe
from shared.registry import ModelRegistry
from shared.settings import Settings

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def _context(spec, settings: Settings, hooks: TrainingHooks | None, device: torch.device) -> RecipeContext:
    return RecipeContext(
        job_id=spec.job_id,
        base_model=ModelRegistry(settings.models, spec.kind).get(spec.base_model),
        dataset_path=spec.dataset_path,
        hyperparameters=spec.hyperparameters,
        total_steps=spec.total_steps,
        settings=settings,
        device=device,
        job_dir=spec.job_dir,
        hooks=hooks,
    )


def train_here(spec, settings: Settings, hooks, adapter_dir: Path | None, device: torch.device) -> TrainingResult:
    """Set up, train and (with `adapter_dir`) save the adapter, in this process."""
    recipe = load_recipe(spec.kind)(_context(spec, settings, hooks, device))
    try:
        recipe.setup()
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


def _rank_main(spec, settings: Settings, rank: int, world_size: int, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    device = _join(rank, world_size, port)
    try:
        train_here(spec, settings, None, None, device)
    finally:
        dist.destroy_process_group()


def train_distributed(spec, settings: Settings, hooks, adapter_dir: Path, world_size: int) -> TrainingResult:
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
        for process in ranks:
            process.join(60)
            if process.is_alive():
                process.terminate()
                process.join()
    failed = [p.name for p in ranks if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"DDP ranks {', '.join(failed)} failed; the worker's log has their errors")
    return result
