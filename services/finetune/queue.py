"""The Celery app of the fine-tune service: one task, "run attempt A of job J", on its own queue.

Messages are acknowledged late (after the task returns), rejected back to the queue if the worker dies,
and prefetched one at a time, so a worker never holds a job it is not running. Celery's own redelivery
after a crash waits for the visibility timeout (set longer than any job, so a long job is never
redelivered while it runs); quick recovery comes from the job leases in `services.finetune.jobs`, and
from the workers' sweep, which sends again a QUEUED job's message that left the queue without being
claimed (`waiting_task_ids` tells which are still in it).
Torch-free: the API sends messages with `send_task` and never imports the worker.
"""

from __future__ import annotations

import json

from celery import Celery
from kombu import Queue

from shared.settings import Settings

TRAIN_TASK = "modelworks.finetune.train"


def make_celery(settings: Settings) -> Celery:
    options = settings.finetune
    app = Celery("modelworks.finetune", broker=settings.redis_address, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(options.queue, routing_key=options.queue)],
        task_default_queue=options.queue,
        task_ignore_result=True,  # a job's state lives in the job store, not in Celery's results
        broker_transport_options={"visibility_timeout": options.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out a Redis restart
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def task_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


def enqueue(app: Celery, queue: str, job_id: str, attempt: int) -> None:
    app.send_task(TRAIN_TASK, args=[job_id, attempt], queue=queue, task_id=task_id(job_id, attempt))


def waiting_task_ids(client, queue: str) -> set[str]:
    """The ids of the tasks waiting in `queue` (not yet taken by a worker), read from the Redis list that
    Kombu's Redis transport keeps per queue: one JSON message per item, the task id in its headers."""
    waiting = set()
    for raw in client.lrange(queue, 0, -1):
        try:
            waiting.add(json.loads(raw)["headers"]["id"])
        except (ValueError, KeyError, TypeError):  # not a Celery task message: nothing of ours
            continue
    return waiting


def dispatch(app: Celery, queue: str, store, job_id: str, attempt: int) -> None:
    """Send the message for attempt `attempt` and record that it went out; the sweeper re-sends any
    attempt left unsent (so a crash between a state change and the send loses no job)."""
    enqueue(app, queue, job_id, attempt)
    store.mark_dispatched(job_id, attempt)
