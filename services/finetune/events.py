"""Following job event streams from the API's event loop: replay from the start, then live, to the end.

All of a server's watchers share one async Redis pool, and at most `finetune.max_watchers` are open at
once: each holds a connection in a blocking read, so an unbounded number would exhaust Redis's clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from services.finetune import metrics
from services.finetune.jobs import JobEvent, JobState, JobStore
from shared.errors import ResourceExhausted

BLOCK_MS = 5000
RETRY_PAUSE_S = 0.5


class EventFollower:
    """The WatchJob streams of one server: a shared Redis pool, a cap on how many are open."""

    def __init__(
        self, redis_url: str, jobs: JobStore, max_watchers: int, socket_timeout_s: float, connect_timeout_s: float
    ):
        self.jobs = jobs
        self.max_watchers = max_watchers
        self.open = 0
        # a blocking read must return before the socket times out, or every read would fail
        self._block_ms = min(BLOCK_MS, int(socket_timeout_s * 500))
        self._client = aioredis.from_url(
            redis_url,
            max_connections=max_watchers,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
        )

    async def follow(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events, holding one of the `max_watchers` places while the stream is open."""
        if self.open >= self.max_watchers:
            raise ResourceExhausted(
                f"too many watchers: {self.open} WatchJob streams are open, the limit is {self.max_watchers} "
                "(finetune.max_watchers); close one or retry later"
            )
        self.open += 1
        metrics.WATCHERS.inc()
        try:
            async for event in self._events(job_id):
                yield event
        finally:
            self.open -= 1
            metrics.WATCHERS.dec()

    async def _events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event of the job in order, then new ones as they are written, until one ends the job.

        A client that reconnects gets the whole history again (stream ids say where each event stands). If
        Redis restarts meanwhile, the read is retried: events it acknowledged were persisted (AOF).
        """
        key, after = self.jobs.events_key(job_id), "0-0"
        while True:
            try:
                reply = await self._client.xread({key: after}, block=self._block_ms, count=200)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            for _, entries in reply or []:
                for event_id, fields in entries:
                    event = JobEvent.from_fields(event_id, fields)
                    after = event.id
                    yield event
                    if event.type == "state" and event.state and JobState(event.state).terminal:
                        return
            if not reply and await self._ended_without_more(job_id, key, after):
                return

    async def _ended_without_more(self, job_id: str, key: str, after: str) -> bool:
        """A job that ended before its terminal event could be written (should not happen), or one removed
        by retention, must not hang its watchers."""
        state = await self._client.hget(self.jobs.job_key(job_id), "state")
        if state is None:
            return True
        if not JobState(state.decode()).terminal:
            return False
        return not await self._client.xrange(key, min=f"({after}", count=1)

    async def aclose(self) -> None:
        await self._client.aclose()
