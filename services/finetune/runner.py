"""Running one attempt of one job on a worker: claim it, keep its lease, train, hand the adapter over.

The outcome of an attempt is one of: SUCCEEDED (the adapter is in the store), FAILED (with a message a
user can act on), CANCELLED (no adapter), handed back to the queue (the worker is shutting down: a
checkpoint first, so the next attempt resumes), or nothing at all (the message was a duplicate, or
another worker took the job over after this one's lease lapsed).
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis

from services.finetune import metrics
from services.finetune.jobs import JobEvent, JobRecord, JobState, JobStore
from services.finetune.training import checkpoint, launch
from services.finetune.training.errors import TrainingInputError
from services.finetune.training.loop import StepReport, StopReason, TooManyBadSteps, TrainingStopped
from shared.adapters import AdapterInfo, AdapterStore
from shared.devices import is_fatal_device_error
from shared.errors import AlreadyExists, ServiceError
from shared.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def with_redis_retry(call: Callable[[], T], patience_s: float = 120.0) -> T:
    """Ride out a Redis restart: retry on connection errors for up to `patience_s`."""
    deadline = time.monotonic() + patience_s
    delay = 0.1
    while True:
        try:
            return call()
        except REDIS_ERRORS:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable; retrying", extra={"retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


@dataclass
class WorkerContext:
    """What every attempt on this worker shares."""

    settings: Settings
    store: JobStore
    name: str
    enqueue: Callable[[str, int], None]
    preempt: threading.Event = field(default_factory=threading.Event)  # set when the worker shuts down
    current_job: str = ""


class LeaseKeeper:
    """Renews a job's lease on a thread; `lost` is set once another worker may own the job.

    The thread never dies quietly: a renewal that fails in any way marks the lease lost, so the attempt
    stops instead of training on while its lease runs out unseen. A renewal later than half the lease
    is logged with its gap, so a lapse under load shows in the worker's log.
    """

    def __init__(self, store: JobStore, job_id: str, token: str, ttl_s: float, every_s: float):
        self.store, self.job_id, self.token, self.ttl_s, self.every_s = store, job_id, token, ttl_s, every_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewed_at = time.monotonic()  # the claim took the lease just before
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def confirm(self) -> bool:
        """Whether the lease is still this attempt's, asked of Redis now (and renewed): the check before
        anything that another attempt's files could suffer from."""
        return not self.lost.is_set() and self._renew()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self._renew():
                    return
            except Exception:
                log.exception("renewing a job's lease failed; the job stops", extra={"job": self.job_id})
                self.lost.set()
                return

    def _renew(self) -> bool:
        try:
            owned = with_redis_retry(lambda: self.store.renew(self.job_id, self.token, self.ttl_s), self.ttl_s)
        except REDIS_ERRORS:
            owned = False
        if not owned:
            log.warning("lost the lease of a job; stopping it", extra={"job": self.job_id})
            self.lost.set()
            return False
        now = time.monotonic()
        if now - self._renewed_at > self.ttl_s / 2:
            log.warning("a job's lease was renewed late", extra={"job": self.job_id, "gap_s": now - self._renewed_at})
        self._renewed_at = now
        return True


class JobHooks:
    """The training loop's hooks for one job: progress into the job store (events, the record), TensorBoard
    and Prometheus; and the answer to "go on?" (cancelled, worker stopping, lease lost).

    Progress is written at most every `finetune.progress_interval_s` (and always at the first and last
    step), with every step's event in it: a tiny model's steps take milliseconds, and a round trip to
    Redis and a wake-up of every watcher per step would cost more than the step. Evaluations,
    checkpoints and warnings are written at once. Cancellation is seen at the next write.
    """

    def __init__(self, context: WorkerContext, job: JobRecord, token: str, lease: LeaseKeeper, tensorboard: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.context, self.job, self.token, self.lease = context, job, token, lease
        self.writer = SummaryWriter(str(tensorboard))
        self.unit = "tokens" if job.kind == "llm" else "images"
        self.interval = context.settings.finetune.progress_interval_s
        self._fields: dict = {}
        self._events: list[JobEvent] = []
        self._last_write = 0.0
        self._reports = 0
        self._stop: StopReason | None = None  # what any write learned; the next step returns it

    def _write(self, fields: dict, event: JobEvent | None) -> StopReason | None:
        """Queue `fields` and `event` and write everything pending now."""
        self._queue(fields, event)
        return self.flush()

    def _queue(self, fields: dict, event: JobEvent | None) -> None:
        self._fields.update(fields)
        if event is not None:
            self._events.append(event)

    def flush(self) -> StopReason | None:
        store, job_id = self.context.store, self.job.id
        fields, events = self._fields, self._events
        self._fields, self._events, self._last_write = {}, [], time.monotonic()
        self._reports += 1
        report_id = f"{self.token}:{self._reports}"  # the same id on every retry of this one write
        try:
            report = with_redis_retry(lambda: store.report(job_id, self.token, fields, events, report_id))
        except REDIS_ERRORS:
            self._stop = StopReason.LEASE_LOST
        else:
            if not report.owned:
                self._stop = StopReason.LEASE_LOST
            elif report.cancel_requested:
                self._stop = self._stop or StopReason.CANCELLED
        return self._local_stop()

    def _local_stop(self) -> StopReason | None:
        if self._stop is None and self.lease.lost.is_set():
            self._stop = StopReason.LEASE_LOST
        if self._stop is None and self.context.preempt.is_set():
            self._stop = StopReason.PREEMPTED
        return self._stop

    def stop_requested(self) -> StopReason | None:
        return self.flush()

    def still_holds_lease(self) -> bool:
        return self.lease.confirm()

    def started(self, resumed_from_step: int, total_steps: int) -> None:
        message = f"resumed from the checkpoint at step {resumed_from_step}" if resumed_from_step else "training"
        self._write(
            {"resumed_from_step": resumed_from_step, "step": resumed_from_step},
            JobEvent("log", state="running", step=resumed_from_step, total_steps=total_steps, message=message),
        )

    def step(self, report: StepReport) -> StopReason | None:
        metrics.STEPS.labels(self.job.kind).inc()
        metrics.STEP_SECONDS.labels(self.job.kind).observe(report.step_seconds)
        metrics.TRAIN_LOSS.labels(self.job.kind).set(report.train_loss)
        metrics.THROUGHPUT.labels(self.job.kind, self.unit).set(report.throughput)
        self.writer.add_scalar("train/loss", report.train_loss, report.step)
        self.writer.add_scalar("train/learning_rate", report.learning_rate, report.step)
        self.writer.add_scalar(f"train/{self.unit}_per_second", report.throughput, report.step)
        fields = {
            "step": report.step,
            "train_loss": report.train_loss,
            "learning_rate": report.learning_rate,
            "throughput": report.throughput,
            "eta_seconds": report.eta_seconds,
            "skipped_steps": report.skipped_steps,
        }
        event = JobEvent(
            "progress",
            state="running",
            step=report.step,
            total_steps=report.total_steps,
            train_loss=report.train_loss,
            learning_rate=report.learning_rate,
            throughput=report.throughput,
            eta_seconds=report.eta_seconds,
        )
        self._queue(fields, event)
        due = time.monotonic() - self._last_write >= self.interval
        if due or report.step in (1, report.total_steps):
            return self.flush()
        return self._local_stop()

    def evaluated(self, step: int, val_loss: float, improved: bool) -> None:
        self.writer.add_scalar("val/loss", val_loss, step)
        note = "best so far" if improved else "no improvement"
        self._write(
            {"val_loss": val_loss},
            JobEvent(
                "eval",
                state="running",
                step=step,
                total_steps=self.job.total_steps,
                val_loss=val_loss,
                message=f"validation loss {val_loss:.4f} ({note})",
            ),
        )

    def checkpointed(self, step: int) -> None:
        self._write(
            {},
            JobEvent(
                "checkpoint",
                state="running",
                step=step,
                total_steps=self.job.total_steps,
                message=f"checkpoint at step {step}",
            ),
        )

    def warning(self, message: str) -> None:
        self._write({}, JobEvent("warning", state="running", total_steps=self.job.total_steps, message=message))

    def close(self) -> None:
        self.writer.close()


def run_job(job_id: str, attempt: int, context: WorkerContext) -> str:
    """Run one attempt of a job if this message may; returns what happened (for logs and tests)."""
    store, options = context.store, context.settings.finetune
    token = secrets.token_hex(16)
    outcome = with_redis_retry(lambda: store.claim(job_id, attempt, context.name, token, options.lease_ttl_s))
    if outcome != "claimed":
        log.info("message dropped", extra={"job": job_id, "attempt": attempt, "reason": outcome})
        return f"dropped ({outcome})"
    context.current_job = job_id
    metrics.JOBS_RUNNING.inc()
    log.info("job started", extra={"job": job_id, "attempt": attempt})
    try:
        with LeaseKeeper(store, job_id, token, options.lease_ttl_s, options.lease_renew_s) as lease:
            return _attempt(job_id, attempt, token, lease, context)
    finally:
        metrics.JOBS_RUNNING.dec()
        context.current_job = ""


def _attempt(job_id: str, attempt: int, token: str, lease: LeaseKeeper, context: WorkerContext) -> str:
    """Everything after the claim; whatever goes wrong ends the job (or hands it back), never leaves it hanging."""
    settings = context.settings
    job = with_redis_retry(lambda: context.store.get(job_id))
    job_dir = settings.jobs_dir / job.id
    adapters = AdapterStore(settings.adapters_dir)
    hooks: JobHooks | None = None
    try:
        if _published_by(adapters, job):  # an earlier attempt wrote the adapter, then died before finishing
            return _succeed(context, job, token, adapters.get(job.adapter_name).metrics, "adapter ready")
        hooks = JobHooks(context, job, token, lease, job_dir / "tensorboard")
        result, adapter_dir = launch.train(launch.spec_for(job, attempt, settings), settings, hooks)
        last_word = hooks.flush()  # the last steps' events come before the final state; a late cancel counts
        if last_word is StopReason.CANCELLED or last_word is StopReason.LEASE_LOST:
            raise TrainingStopped(last_word, result.steps)
        info = AdapterInfo(
            name=job.adapter_name,
            kind=job.kind,
            base_model=job.base_model,
            method=job.hyperparameters.get("method", "lora"),
            quantization=job.hyperparameters.get("quantization") or "none",
            job_id=job.id,
            metrics=_metrics_of(result, job.kind),
            owner=job.owner,
        )
        adapters.save(info, lambda folder: _copy_into(adapter_dir, folder))
        note = " (stopped early)" if result.stopped_early else ""
        if result.test_loss is not None:
            note += f"; test loss {result.test_loss:.4f}"
        return _succeed(context, job, token, info.metrics, f"adapter {job.adapter_name!r} is ready{note}")
    except TrainingStopped as stopped:
        if hooks is not None and stopped.reason is not StopReason.LEASE_LOST:
            hooks.flush()
        return _stopped(context, job, token, stopped)
    except AlreadyExists:
        if _published_by(adapters, job):
            return _succeed(context, job, token, adapters.get(job.adapter_name).metrics, "adapter ready")
        _fail(context, job, token, f"adapter {job.adapter_name!r} was created by someone else while this job ran")
        return "failed"
    except TooManyBadSteps as exc:
        _fail(context, job, token, str(exc))
        return "failed"
    except Exception as exc:
        if is_fatal_device_error(exc):  # the device is gone for this process: hand the job to another worker
            log.exception("fatal device error; handing the job back and stopping the worker", extra={"job": job.id})
            _hand_back(context, job, token, "its worker's accelerator failed; queued again to resume elsewhere")
            raise
        log.exception("job failed", extra={"job": job.id})
        _fail(context, job, token, _describe(exc))
        return "failed"
    finally:
        if hooks is not None:
            hooks.close()


def _published_by(adapters: AdapterStore, job: JobRecord) -> bool:
    try:
        return adapters.get(job.adapter_name).job_id == job.id
    except ServiceError:
        return False


def _succeed(context: WorkerContext, job: JobRecord, token: str, values: dict, message: str) -> str:
    fields = {"step": int(values.get("steps", job.total_steps)), "train_loss": values.get("train_loss", 0.0)}
    fields |= {"eta_seconds": 0} | {k: values[k] for k in ("val_loss", "test_loss", "test_perplexity") if k in values}
    _finish(context, job, token, JobState.SUCCEEDED, fields, message)
    return "succeeded"


def _stopped(context: WorkerContext, job: JobRecord, token: str, stopped: TrainingStopped) -> str:
    if stopped.reason is StopReason.CANCELLED:
        if stopped.step:  # 0: stopped around setup, before a step; the record keeps any earlier attempt's step
            fields, message = {"step": stopped.step}, f"cancelled at step {stopped.step}"
        else:
            fields, message = {}, "cancelled before training started"
        _finish(context, job, token, JobState.CANCELLED, fields, message)
        return "cancelled"
    if stopped.reason is StopReason.PREEMPTED:
        _hand_back(context, job, token, f"its worker is shutting down; queued again to resume from step {stopped.step}")
        return "handed back"
    log.warning("another worker owns this job now; this attempt stops", extra={"job": job.id})
    return "lease lost"


def _hand_back(context: WorkerContext, job: JobRecord, token: str, message: str) -> None:
    max_attempts = context.settings.finetune.max_attempts
    attempt = with_redis_retry(lambda: context.store.release(job.id, token, message, max_attempts))
    if attempt is not None:
        context.enqueue(job.id, attempt)
    elif with_redis_retry(lambda: context.store.get(job.id)).state.terminal:  # cancelled or out of attempts
        checkpoint.remove_all(context.settings.jobs_dir / job.id)


def _finish(context: WorkerContext, job: JobRecord, token: str, state: JobState, fields: dict, message: str) -> None:
    """End the job if this attempt still owns it; an ended job keeps no checkpoints (nothing resumes it)."""
    done = with_redis_retry(lambda: context.store.finish(job.id, token, state, fields, message))
    if done:
        metrics.JOBS.labels(job.kind, state.value).inc()
        log.info("job ended", extra={"job": job.id, "state": state.value})
        checkpoint.remove_all(context.settings.jobs_dir / job.id)
    else:
        log.warning("the job's lease was lost before it could be ended here", extra={"job": job.id})


def _fail(context: WorkerContext, job: JobRecord, token: str, message: str) -> None:
    _finish(context, job, token, JobState.FAILED, {"error": message}, message)


def _describe(exc: Exception) -> str:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return (
            "out of accelerator memory: lower batch_size, max_seq_length or resolution, or use mixed_precision, "
            "gradient_checkpointing, or (LLM jobs) quantization bnb-nf4"
        )
    if isinstance(exc, TrainingInputError):  # written for users: it says what to change
        return str(exc)
    if isinstance(exc, ServiceError):  # the shared library's refusals are written for users too
        return exc.message
    return f"training failed with an internal error ({type(exc).__name__}); the worker's log has the details"


def _metrics_of(result, kind: str) -> dict[str, float]:
    """The adapter's metrics: the final training loss, the best validation loss, and the test split's loss
    (an LLM's also as perplexity per label token)."""
    values = {"train_loss": result.train_loss, "steps": float(result.steps)}
    if result.best_val_loss is not None:
        values["val_loss"] = result.best_val_loss
    if result.test_loss is not None:
        values["test_loss"] = result.test_loss
        if kind == "llm":
            values["test_perplexity"] = math.exp(min(result.test_loss, 700.0))
    return values


def _copy_into(source: Path, target: Path) -> None:
    for item in source.iterdir():
        shutil.copy2(item, target / item.name)
