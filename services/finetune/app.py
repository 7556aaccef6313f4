"""Wire the fine-tune API together: the servicer over the job store, dataset store and the Celery queue."""

from __future__ import annotations

import asyncio
import logging

import redis

from modelworks.finetune.v1 import finetune_pb2_grpc
from services.finetune.api import FineTuneAPI
from services.finetune.datasets import DatasetStore
from services.finetune.jobs import JobStore
from services.finetune.queue import make_celery
from services.finetune.samples import ensure_samples
from services.finetune.servicer import SERVICE_NAME, FineTuneServicer
from shared.serving import GrpcService, ServerOptions
from shared.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings, options: ServerOptions) -> int:
    client = redis.Redis.from_url(settings.redis_address)
    datasets = DatasetStore(settings.datasets_dir, settings.finetune)
    api = FineTuneAPI(settings, JobStore(client), datasets, make_celery(settings))
    service = GrpcService(settings, options, [SERVICE_NAME])
    finetune_pb2_grpc.add_FineTuneServiceServicer_to_server(
        FineTuneServicer(api, settings.redis_address), service.server
    )
    await service.start()
    await asyncio.to_thread(ensure_samples, datasets)
    while not service.stop_requested.is_set():  # SERVING once the job store answers
        try:
            await asyncio.to_thread(client.ping)
            break
        except redis.ConnectionError:
            log.warning("waiting for Redis", extra={"redis": settings.redis_address})
            await asyncio.sleep(1)
    else:
        await service.server.stop(0)
        return 0
    await service.set_ready()
    return await service.run_until_stopped()
