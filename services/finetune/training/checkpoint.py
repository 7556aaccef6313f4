"""Training checkpoints: everything needed to resume a job exactly where it stopped.

A checkpoint is a folder `checkpoint-<step>/` in the job's folder with the trainable weights
(`trainable.safetensors`; the best-so-far weights in `best.safetensors` when validation tracks them) and
`state.pt`: optimizer, LR scheduler, gradient scaler, RNG states, the step and the early-stopping state.
The data position follows from the step. Files and folder are fsynced, then a `latest` file naming the
new checkpoint replaces the old one atomically; the previous checkpoint is kept until the next one is in
place, and a checkpoint that cannot be read (a host crash mid-write) falls back to the one before.
Loading uses `weights_only=True`: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

LATEST = "latest"


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


def save(
    job_dir: Path, model, optimizer, scheduler, scaler, state: LoopState, best: dict[str, torch.Tensor] | None
) -> Path:
    folder = job_dir / f"checkpoint-{state.step}"
    staging = job_dir / f".checkpoint-{state.step}.tmp"
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
    if folder.exists():  # the same step saved before (a resumed run): it is not the one `latest` names
        shutil.rmtree(folder)
    os.rename(staging, folder)
    pointer = job_dir / f".{LATEST}.tmp"
    pointer.write_text(folder.name)
    _fsync(pointer)
    previous = _named(job_dir)
    os.replace(pointer, job_dir / LATEST)  # the switch to the new checkpoint is this one atomic rename
    _fsync(job_dir)
    keep = {folder.name, previous.name if previous else ""}
    for old in job_dir.glob("checkpoint-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _named(job_dir: Path) -> Path | None:
    pointer = job_dir / LATEST
    return job_dir / pointer.read_text().strip() if pointer.is_file() else None


def restore_latest(job_dir: Path, model, optimizer, scheduler, scaler):
    """Restore the newest readable checkpoint: (loop state, best weights), or None when there is none."""
    newest = _named(job_dir)
    candidates = sorted(job_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    if newest is not None and newest in candidates:
        candidates.remove(newest)
        candidates.insert(0, newest)
    for folder in candidates:
        try:
            return restore(folder, model, optimizer, scheduler, scaler)
        except Exception as exc:  # a torn write: try the one before
            log.warning(
                "checkpoint unreadable; trying an older one", extra={"checkpoint": folder.name, "error": repr(exc)}
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
