"""Following a job's event stream from the API's event loop: replay from the start, then live, to the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from services.finetune.jobs import JobEvent, JobState, JobStore

BLOCK_MS = 5000


async def follow_events(redis_url: str, jobs: JobStore, job_id: str) -> AsyncIterator[JobEvent]:
    """Every event of the job in order, then new ones as they are written, until one ends the job.

    A client that reconnects gets the whole history again (stream ids say where each event stands). If
    Redis restarts meanwhile, the read is retried: events it acknowledged were persisted (AOF).
    """
    client = aioredis.from_url(redis_url)
    key, after = jobs.events_key(job_id), "0-0"
    try:
        while True:
            try:
                reply = await client.xread({key: after}, block=BLOCK_MS, count=200)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                await _pause()
                continue
            for _, entries in reply or []:
                for event_id, fields in entries:
                    event = JobEvent.from_fields(event_id, fields)
                    after = event.id
                    yield event
                    if event.type == "state" and event.state and JobState(event.state).terminal:
                        return
            if not reply and await _ended_without_more(client, jobs, job_id, key, after):
                return
    finally:
        await client.aclose()


async def _ended_without_more(client, jobs: JobStore, job_id: str, key: str, after: str) -> bool:
    """A job that ended before its terminal event could be written (should not happen) must not hang watchers."""
    state = await client.hget(jobs.job_key(job_id), "state")
    if state is None:
        return True
    if not JobState(state.decode()).terminal:
        return False
    return not await client.xrange(key, min=f"({after}", count=1)


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.5)
