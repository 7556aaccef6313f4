"""Wire the fine-tune API together: the servicer over the job store, dataset store and the Celery queue.

The API process also runs the retention sweep: finished jobs older than `finetune.job_retention_days`
are removed (record, events, folder) about every hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
from kombu.utils.url import maybe_sanitize_url

from modelworks.finetune.v1 import finetune_pb2_grpc
from services.finetune.api import DAY_S, FineTuneAPI
from services.finetune.datasets import DatasetStore
from services.finetune.events import EventFollower
from services.finetune.jobs import JobStore
from services.finetune.queue import make_celery
from services.finetune.samples import ensure_samples
from services.finetune.servicer import REDIS_FAULTS, SERVICE_NAME, FineTuneServicer
from shared.serving import GrpcService, ServerOptions
from shared.settings import Settings

log = logging.getLogger(__name__)

RETENTION_SWEEP_S = 3600.0


def redacted(url: str) -> str:
    """The Redis URL with its password masked, as it may appear in a log line."""
    return maybe_sanitize_url(url, mask="***")


async def serve(settings: Settings, options: ServerOptions) -> int:
    finetune = settings.finetune
    client = redis.Redis.from_url(
        settings.redis_address,
        socket_timeout=finetune.redis_socket_timeout_s,
        socket_connect_timeout=finetune.redis_connect_timeout_s,
    )
    jobs = JobStore(client, max_events=finetune.max_events_per_job)
    datasets = DatasetStore(settings.datasets_dir, finetune)
    api = FineTuneAPI(settings, jobs, datasets, make_celery(settings))
    watchers = EventFollower(
        settings.redis_address,
        jobs,
        finetune.max_watchers,
        finetune.redis_socket_timeout_s,
        finetune.redis_connect_timeout_s,
    )
    service = GrpcService(settings, options, [SERVICE_NAME])
    finetune_pb2_grpc.add_FineTuneServiceServicer_to_server(FineTuneServicer(api, watchers), service.server)
    await service.start()
    await asyncio.to_thread(ensure_samples, datasets)
    if not await _wait_for_redis(client, settings.redis_address, service.stop_requested):
        await service.server.stop(0)
        await watchers.aclose()
        return 0
    await service.set_ready()
    retention = asyncio.create_task(_sweep_retention(api, _sweep_interval_s(settings), service.stop_requested))

    async def on_shutdown() -> None:
        retention.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retention
        await watchers.aclose()

    return await service.run_until_stopped(on_shutdown)


async def _wait_for_redis(client: redis.Redis, url: str, stop: asyncio.Event) -> bool:
    """SERVING once the job store answers; False if asked to stop first."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(client.ping)
            return True
        except REDIS_FAULTS:
            log.warning("waiting for Redis", extra={"redis": redacted(url)})
            await asyncio.sleep(1)
    return False


def _sweep_interval_s(settings: Settings) -> float:
    """Hourly, or more often when the retention itself is short (a tenth of it, at least a second)."""
    return max(1.0, min(RETENTION_SWEEP_S, settings.finetune.job_retention_days * DAY_S / 10))


async def _sweep_retention(api: FineTuneAPI, interval_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(api.expire_finished_jobs)
        except REDIS_FAULTS as exc:  # Redis down: the next sweep catches up
            log.warning("retention sweep skipped", extra={"error": str(exc)})
        except Exception:  # never let one bad sweep end the loop
            log.exception("retention sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
