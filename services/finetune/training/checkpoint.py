"""Training checkpoints: everything needed to resume a job exactly where it stopped.

A checkpoint is a folder `checkpoint-<step>/` in the job's folder with the trainable weights
(`trainable.safetensors`; the best-so-far weights in `best.safetensors` when validation tracks them) and
`state.pt`: optimizer, LR scheduler, gradient scaler, RNG states, the step and the early-stopping state.
The micro-batch position follows from the step. A `latest` file names the newest complete checkpoint;
it is replaced atomically after the folder is written, so a crash mid-save leaves the previous one in
force. Loading uses `weights_only=True`: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(staging, folder)
    pointer = job_dir / f".{LATEST}.tmp"
    pointer.write_text(folder.name)
    os.replace(pointer, job_dir / LATEST)  # the switch to the new checkpoint is this one atomic rename
    for old in job_dir.glob("checkpoint-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest(job_dir: Path) -> Path | None:
    pointer = job_dir / LATEST
    if not pointer.is_file():
        return None
    folder = job_dir / pointer.read_text().strip()
    return folder if (folder / "state.pt").is_file() else None


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
