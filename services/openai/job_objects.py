"""The fine-tune service's jobs and events as OpenAI's `fine_tuning.job`, `.job.event` and `.job.checkpoint`."""

from __future__ import annotations

import time

from modelworks.finetune.v1 import finetune_pb2 as pb

STATUSES = {
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
}


def _hyperparameters(hp: pb.Hyperparameters) -> dict:
    return {
        "n_epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": hp.learning_rate_multiplier or 1.0,
    }


def _seconds(value: float) -> int | None:
    return int(value) if value else None


def job_object(job: pb.Job) -> dict:
    hp = _hyperparameters(job.hyperparameters)
    running = job.state == pb.JOB_STATE_RUNNING
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": _seconds(job.finished_at),
        "model": job.base_model,
        "fine_tuned_model": job.adapter_name if job.state == pb.JOB_STATE_SUCCEEDED else None,
        "organization_id": job.owner or "local",
        "status": STATUSES.get(job.state, "queued"),
        "error": {"code": "job_failed", "message": job.error, "param": None}
        if job.state == pb.JOB_STATE_FAILED
        else None,
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "training_file": job.dataset_id,
        "validation_file": job.validation_dataset_id or None,
        "result_files": [],
        "trained_tokens": None,
        "seed": job.hyperparameters.seed,
        "estimated_finish": int(time.time() + job.eta_seconds) if running and job.eta_seconds > 0 else None,
        "integrations": [],
        "metadata": None,
        # ModelWorks' own: what the job trains and how far it is
        "adapter_name": job.adapter_name,
        "adapter_method": job.hyperparameters.method,
        "step": job.step,
        "total_steps": job.total_steps,
        "train_loss": job.train_loss or None,
        "valid_loss": job.val_loss or None,
    }


def _metrics(event: pb.JobEvent) -> dict:
    data = {"step": event.step, "total_steps": event.total_steps}
    if event.type == "eval":
        data["valid_loss"] = event.val_loss
    else:
        data["train_loss"] = event.train_loss
    if event.learning_rate:
        data["learning_rate"] = event.learning_rate
    return data


def _message(event: pb.JobEvent) -> str:
    if event.message:
        return event.message
    if event.type == "progress":
        return f"Step {event.step}/{event.total_steps}: training loss={event.train_loss:.4f}"
    if event.type == "eval":
        return f"Step {event.step}/{event.total_steps}: validation loss={event.val_loss:.4f}"
    if event.type == "state":
        return f"Job {STATUSES.get(event.state, 'updated')}"
    return event.type


def event_object(event: pb.JobEvent) -> dict:
    metrics = event.type in ("progress", "eval")
    failed = event.type == "state" and event.state == pb.JOB_STATE_FAILED
    return {
        "id": event.event_id,
        "object": "fine_tuning.job.event",
        "created_at": int(event.time),
        "level": "error" if failed else "warn" if event.type == "warning" else "info",
        "message": _message(event),
        "type": "metrics" if metrics else "message",
        "data": _metrics(event) if metrics else {"kind": event.type},
    }


def checkpoint_object(job: pb.Job) -> dict:
    metrics = {"step": float(job.step), "train_loss": job.train_loss}
    if job.val_loss:
        metrics |= {"valid_loss": job.val_loss, "full_valid_loss": job.val_loss}
    if job.test_loss:
        metrics["test_loss"] = job.test_loss
    return {
        "id": f"ftckpt-{job.id.removeprefix('ftjob-')}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(job.finished_at),
        "fine_tuned_model_checkpoint": job.adapter_name,
        "fine_tuning_job_id": job.id,
        "metrics": metrics,
        "step_number": job.step,
    }
