"""Training checkpoints: everything needed to resume a job exactly where it stopped.

Each attempt of a job writes into its own folder, `checkpoints/attempt-<n>/` in the job's folder, and
resumes from the newest readable checkpoint of the latest earlier attempt that left one (those of releases
before per-attempt folders, `checkpoint-<k>/` in the job's folder, count as attempt 0). A checkpoint
is a folder `step-<k>/` with the trainable weights (`trainable.safetensors`; the best-so-far weights in
`best.safetensors` when validation tracks them) and `state.pt`: optimizer, LR scheduler, gradient
scaler, RNG states, the step and the early-stopping state. The data position follows from the step.
Files and folder are fsynced, then a `latest` file naming the new checkpoint replaces the old one
atomically; the previous checkpoint is kept until the next one is in place, and a checkpoint that cannot
be read (a host crash mid-write) falls back to the one before.

A worker can lose its job's lease and not know it yet (paused past the lease, cut off from Redis) while
another worker resumes the job. So a save asks `still_holds_lease` before it writes and again before it
prunes, and pruning only ever removes this attempt's older checkpoints and earlier attempts' folders:
never a later attempt's, whoever runs it.
Loading uses `weights_only=True`: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CLASS_IMAGES = "class-images"  # DreamBooth prior preservation's, drawn once per job (a resume reuses them)
LATEST = "latest"
STEP_PREFIX = "step-"  # a checkpoint folder: step-<k>
LEGACY_ATTEMPT = 0  # checkpoints an older release wrote into the job's folder (attempts start at 1)
LEGACY_PREFIX = "checkpoint-"  # and how it named them


class LeaseLost(Exception):
    """This attempt no longer owns its job: it must neither write nor delete checkpoints."""


def _always() -> bool:
    return True


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # NaN/Inf losses
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_train_loss: float = 0.0
    last_val_loss: float = 0.0


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def attempt_folder(job_dir: Path, attempt: int) -> Path:
    return job_dir / CHECKPOINTS / f"attempt-{attempt}"


def remove_all(job_dir: Path) -> None:
    """Every attempt's checkpoints and the class images they train with (the job has ended; its logs and
    TensorBoard events stay)."""
    shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(job_dir / CLASS_IMAGES, ignore_errors=True)
    _remove_legacy(job_dir)


def _remove_legacy(job_dir: Path) -> None:
    for old in job_dir.glob(f"{LEGACY_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
    (job_dir / LATEST).unlink(missing_ok=True)


def save(
    job_dir: Path,
    attempt: int,
    model,
    optimizer,
    scheduler,
    scaler,
    state: LoopState,
    best: dict[str, torch.Tensor] | None,
    still_holds_lease: Callable[[], bool] = _always,
) -> Path:
    """Write a checkpoint of this attempt and prune what it supersedes; LeaseLost if the job is not ours."""
    if not still_holds_lease():
        raise LeaseLost(f"attempt {attempt} lost its lease before saving step {state.step}")
    folder = attempt_folder(job_dir, attempt)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _named(folder)
    checkpoint = _write(folder, model, optimizer, scheduler, scaler, state, best)
    if not still_holds_lease():
        raise LeaseLost(f"attempt {attempt} lost its lease before pruning its checkpoints")
    _prune(job_dir, attempt, keep={checkpoint, previous})
    return checkpoint


def _write(folder: Path, model, optimizer, scheduler, scaler, state: LoopState, best) -> Path:
    target = folder / f"{STEP_PREFIX}{state.step}"
    staging = folder / f".step-{state.step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(trainable_state(model), str(staging / "trainable.safetensors"))
    if best is not None:
        save_file(best, str(staging / "best.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
            "loop": json.dumps(asdict(state)),
        },
        staging / "state.pt",
    )
    for item in staging.iterdir():
        _fsync(item)
    _fsync(staging)
    if target.exists():  # the same step saved before (a resumed run): it is not the one `latest` names
        shutil.rmtree(target)
    os.rename(staging, target)
    pointer = folder / f".{LATEST}.tmp"
    pointer.write_text(target.name)
    _fsync(pointer)
    os.replace(pointer, folder / LATEST)  # the switch to the new checkpoint is this one atomic rename
    _fsync(folder)
    return target


def _prune(job_dir: Path, attempt: int, keep: set[Path | None]) -> None:
    """This attempt's checkpoints but the newest two; and once it has two, the folders of earlier attempts
    (until then, they are what a torn write falls back to)."""
    for old in attempt_folder(job_dir, attempt).glob(f"{STEP_PREFIX}*"):
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    if None in keep:
        return
    for number, folder in _attempt_folders(job_dir):
        if number == LEGACY_ATTEMPT:  # the job's own folder: only the checkpoints in it
            _remove_legacy(job_dir)
        elif number < attempt:
            shutil.rmtree(folder, ignore_errors=True)


def _attempt_folders(job_dir: Path) -> list[tuple[int, Path]]:
    """(attempt, folder), newest attempt first; the job's folder itself last when an older release's
    checkpoints are in it."""
    found = []
    for folder in (job_dir / CHECKPOINTS).glob("attempt-*"):
        number = folder.name.removeprefix("attempt-")
        if number.isdigit():
            found.append((int(number), folder))
    if any(job_dir.glob(f"{LEGACY_PREFIX}*")):
        found.append((LEGACY_ATTEMPT, job_dir))
    return sorted(found, reverse=True)


def _named(folder: Path) -> Path | None:
    pointer = folder / LATEST
    return folder / pointer.read_text().strip() if pointer.is_file() else None


def _candidates(folder: Path, prefix: str) -> list[Path]:
    """One attempt's checkpoints, the one `latest` names first, then newest first."""
    steps = [p for p in folder.glob(f"{prefix}*") if p.name.removeprefix(prefix).isdigit()]
    steps.sort(key=lambda p: int(p.name.removeprefix(prefix)), reverse=True)
    newest = _named(folder)
    if newest is not None and newest in steps:
        steps.remove(newest)
        steps.insert(0, newest)
    return steps


def restore_latest(job_dir: Path, attempt: int, model, optimizer, scheduler, scaler):
    """Restore the newest readable checkpoint of the latest attempt up to `attempt` that left one:
    (loop state, best weights), or None when there is none."""
    for number, folder in _attempt_folders(job_dir):
        if number > attempt:  # a later attempt's: another worker's now
            continue
        prefix = LEGACY_PREFIX if number == LEGACY_ATTEMPT else STEP_PREFIX
        for checkpoint in _candidates(folder, prefix):
            try:
                return restore(checkpoint, model, optimizer, scheduler, scaler)
            except Exception as exc:  # a torn write: try the one before
                log.warning(
                    "checkpoint unreadable; trying an older one",
                    extra={"checkpoint": str(checkpoint.relative_to(job_dir)), "error": repr(exc)},
                )
    return None


def restore(folder: Path, model, optimizer, scheduler, scaler) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
    load_trainable(model, load_file(str(folder / "trainable.safetensors")))
    saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    best_path = folder / "best.safetensors"
    best = load_file(str(best_path)) if best_path.is_file() else None
    return LoopState(**json.loads(saved["loop"])), best
