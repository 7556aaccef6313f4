"""`python -m services.finetune.worker`: a Celery worker that trains fine-tuning jobs, one at a time.

One process per GPU (`CUDA_VISIBLE_DEVICES` picks it; `finetune.devices` > 1 trains each job with DDP
over that many), solo pool, prefetch 1, late acks, its own queue. Besides the Celery consumer it runs:
- a maintenance thread: registers this worker (device, CUDA, bf16) for the API's checks, and sweeps for
  jobs whose lease lapsed (a worker killed mid-job), queueing them again to resume from their checkpoint,
  and for QUEUED jobs whose message was never sent or was lost (taken by a worker that died before it
  claimed the job): each is sent again, so every message ends claimed or re-sent;
- Prometheus metrics on `finetune.worker_metrics_port` (9104).
SIGTERM is a graceful stop: a running job checkpoints and goes back to the queue for another worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import redis
from celery import signals

from services.finetune import metrics
from services.finetune.jobs import JobState, JobStore
from services.finetune.queue import TRAIN_TASK, dispatch, make_celery, task_id, waiting_task_ids
from services.finetune.runner import REDIS_ERRORS, WorkerContext, run_job
from services.finetune.training import checkpoint
from services.finetune.training.recipe import RECIPES, load_recipe
from shared.allocator import keep_freed_memory_for_reuse
from shared.cli import check_required_gpu
from shared.devices import is_fatal_device_error
from shared.loaders import disable_progress_bars
from shared.logs import configure_logging
from shared.metrics import start_metrics_server
from shared.settings import Settings, load_settings

log = logging.getLogger("services.finetune.worker")


def device_info() -> dict:
    import torch

    from shared.devices import auto_mixed_precision

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "bf16": auto_mixed_precision(torch.device("cuda" if cuda else "cpu")) == "bf16",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


class Maintenance(threading.Thread):
    """Worker registration, the lease sweeper and the queue gauges, every few seconds."""

    def __init__(self, context: WorkerContext, info: dict):
        super().__init__(name="maintenance", daemon=True)
        self.context, self.info = context, info
        self.stopping = threading.Event()

    def run(self) -> None:
        options = self.context.settings.finetune
        last_sweep = 0.0
        while not self.stopping.is_set():
            try:
                self.context.store.register_worker(
                    self.context.name,
                    self.info | {"job": self.context.current_job, "seen": time.time()},
                    ttl_s=3 * options.lease_renew_s,
                )
                if time.monotonic() - last_sweep >= options.sweep_interval_s:
                    self.sweep()
                    last_sweep = time.monotonic()
            except REDIS_ERRORS:
                log.warning("Redis unreachable; maintenance retries shortly")
            except Exception:
                log.exception("maintenance failed; it retries shortly")
            self.stopping.wait(min(options.lease_renew_s, options.sweep_interval_s))

    def sweep(self) -> None:
        options = self.context.settings.finetune
        expired = self.context.store.requeue_expired(options.max_attempts)
        for job_id, attempt in expired.requeued:
            log.warning("requeued a job whose worker was lost", extra={"job": job_id, "attempt": attempt})
            metrics.REQUEUED.inc()
            self.context.enqueue(job_id, attempt)
        for job_id in expired.ended:  # cancelled, or out of attempts: nothing resumes it
            log.warning("ended a job whose worker was lost", extra={"job": job_id})
            checkpoint.remove_all(self.context.settings.jobs_dir / job_id)
        for job_id, attempt in self._unsent_or_lost():
            log.warning("re-sent a job's message: never sent, or lost", extra={"job": job_id, "attempt": attempt})
            self.context.enqueue(job_id, attempt)
        active = [self.context.store.get(j) for j in self._active_ids()]
        for state in (JobState.QUEUED, JobState.RUNNING):
            metrics.JOBS_BY_STATE.labels(state.value).set(sum(1 for job in active if job.state == state))

    def _unsent_or_lost(self) -> list[tuple[str, int]]:
        """QUEUED attempts never sent, or sent over a lease ago and no longer waiting in the queue."""
        options, store = self.context.settings.finetune, self.context.store
        found = store.undispatched(older_than_s=2 * options.sweep_interval_s, sent_before_s=options.lease_ttl_s)
        if not found:
            return []
        waiting = waiting_task_ids(store.redis, options.queue)
        return [(job_id, attempt) for job_id, attempt in found if task_id(job_id, attempt) not in waiting]

    def _active_ids(self) -> list[str]:
        store = self.context.store
        return [raw.decode() for raw in store.redis.smembers(store.active_key)]


def build(settings: Settings, name: str):
    """The Celery app with the training task, and the context every attempt shares."""
    app = make_celery(settings)
    client = redis.Redis.from_url(
        settings.redis_address,
        health_check_interval=10,
        socket_timeout=settings.finetune.redis_socket_timeout_s,
        socket_connect_timeout=settings.finetune.redis_connect_timeout_s,
    )
    store = JobStore(client, max_events=settings.finetune.max_events_per_job)
    queue = settings.finetune.queue
    context = WorkerContext(settings, store, name, lambda job_id, attempt: dispatch(app, queue, store, job_id, attempt))

    @app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def train(job_id: str, attempt: int) -> str:
        try:
            return run_job(job_id, int(attempt), context)
        except Exception as exc:
            if is_fatal_device_error(exc):  # the job went back to the queue; this process cannot train again
                log.critical("the accelerator failed; the worker exits so it can be restarted")
                logging.shutdown()
                os._exit(70)
            raise

    return app, context


def quiet_celery_startup() -> None:
    """Celery warns at every start that it runs as root: the images run their workers as root by design (the
    container is the boundary), so the warning is noise to whoever reads the log."""
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings(
        "ignore", message="You're running the worker with superuser privileges", category=SecurityWarning
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.finetune.worker", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="YAML config (default: $MODELWORKS_CONFIG or config/modelworks.yaml)"
    )
    parser.add_argument("--name", default=f"worker-{os.getpid()}@{socket.gethostname()}", help="worker name")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 picks one, -1 disables)")
    parser.add_argument("--ready-file", type=Path, help="write the worker's name and metrics port here once ready")
    args = parser.parse_args(argv)
    keep_freed_memory_for_reuse()
    settings = load_settings(args.config)
    configure_logging("finetune-worker", settings.log_level, settings.log_format)
    check_required_gpu(settings)
    app, context = build(settings, args.name)
    for kind in RECIPES:  # import the recipes (transformers, peft, diffusers: seconds) before the first job
        load_recipe(kind)
    disable_progress_bars()
    port = settings.finetune.worker_metrics_port if args.metrics_port is None else args.metrics_port
    metrics.export_every_series()
    metrics_port = start_metrics_server(port, settings.metrics_bind_address)
    maintenance = Maintenance(context, device_info() | {"name": args.name, "pid": os.getpid()})
    maintenance.start()

    @signals.worker_ready.connect(weak=False)
    def ready(sender=None, **_):
        log.info("worker ready", extra={"worker": args.name, "queue": settings.finetune.queue})
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"name": args.name, "metrics_port": metrics_port, "pid": os.getpid()}))
            tmp.rename(args.ready_file)

    @signals.worker_shutting_down.connect(weak=False)
    def shutting_down(sig=None, how=None, exitcode=None, **_):
        log.info("worker stopping; a running job checkpoints and goes back to the queue", extra={"signal": sig})
        context.preempt.set()

    quiet_celery_startup()
    app.worker_main(
        [
            "--quiet",  # no banner: the log says "worker ready" with the queue
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "-Q",
            settings.finetune.queue,
            "-n",
            args.name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            settings.log_level,
        ]
    )
    maintenance.stopping.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
