"""Fine-tuning metrics: the worker's (jobs, steps, step time, loss, throughput), the queue as seen by all, and the
API server's (open watchers, expired jobs)."""

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("modelworks_finetune_jobs", "Jobs that ended on this worker, by kind and final state", ["kind", "state"])
JOBS_RUNNING = Gauge("modelworks_finetune_jobs_running", "Jobs this worker is training now")
JOBS_BY_STATE = Gauge("modelworks_finetune_jobs_active", "Unfinished jobs in the whole system, by state", ["state"])
STEPS = Counter("modelworks_finetune_steps", "Optimizer steps run on this worker", ["kind"])
STEP_SECONDS = Histogram(
    "modelworks_finetune_step_seconds",
    "Time of one optimizer step",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
TRAIN_LOSS = Gauge("modelworks_finetune_train_loss", "Training loss of the latest step", ["kind"])
THROUGHPUT = Gauge("modelworks_finetune_throughput", "Items trained per second (tokens or images)", ["kind", "unit"])
REQUEUED = Counter("modelworks_finetune_requeued", "Jobs this worker's sweeper requeued after their lease lapsed")
WATCHERS = Gauge("modelworks_finetune_watchers", "WatchJob streams open on this API server (finetune.max_watchers)")
EXPIRED = Counter("modelworks_finetune_jobs_expired", "Finished jobs removed after finetune.job_retention_days")


def export_every_series() -> None:
    """Create each labelled series at zero, so dashboards and rate() see them before the first job."""
    for kind, unit in (("llm", "tokens"), ("diffusion", "images")):
        STEPS.labels(kind)
        STEP_SECONDS.labels(kind)
        TRAIN_LOSS.labels(kind)
        THROUGHPUT.labels(kind, unit)
        for state in ("succeeded", "failed", "cancelled"):
            JOBS.labels(kind, state)
    for state in ("queued", "running"):
        JOBS_BY_STATE.labels(state)
