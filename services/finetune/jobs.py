"""Job records, leases and event streams in Redis: the authoritative state of every fine-tuning job.

Celery only carries "run job J, attempt A" messages. Whether a job runs is decided here, atomically:

- `claim` (a worker starting a message) succeeds only for a QUEUED job whose attempt matches the
  message's, and takes a lease (a key with a TTL holding the worker's token). A duplicate or late
  redelivery of a message finds the job RUNNING or at a newer attempt and is dropped: never two runs of
  one job at once.
- The running worker renews its lease every few seconds; every progress report and the final result
  are written only while it still holds the lease.
- `requeue_expired` (run by every worker's sweeper) turns RUNNING jobs whose lease expired (a worker
  killed, a host gone) back into QUEUED with the next attempt; the caller sends the new message, and the
  next worker resumes from the job's last checkpoint.

Each job has an event stream (`XADD`): WatchJob replays it from the start and then follows it live.
Torch-free: the API and the worker both use it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum

import redis

from shared.errors import AlreadyExists, FailedPrecondition, NotFound

PREFIX = "modelworks"
JOB_ID_RE = re.compile(r"^ftjob-[0-9a-f]{16}$")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobRecord:
    id: str
    kind: str
    base_model: str
    dataset_id: str
    adapter_name: str
    hyperparameters: dict
    total_steps: int
    state: JobState = JobState.QUEUED
    step: int = 0
    train_loss: float = 0.0
    val_loss: float = 0.0
    error: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    attempt: int = 1
    worker: str = ""
    eta_seconds: float = 0.0
    learning_rate: float = 0.0
    throughput: float = 0.0
    resumed_from_step: int = 0
    skipped_steps: int = 0
    cancel_requested: bool = False
    queued_at: float = 0.0  # when it last became QUEUED
    dispatched_attempt: int = 0  # the attempt whose Celery message was sent

    def to_hash(self) -> dict[str, str]:
        data = asdict(self)
        data["state"] = self.state.value
        data["hyperparameters"] = json.dumps(self.hyperparameters)
        data["cancel_requested"] = int(self.cancel_requested)
        return {k: str(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "state":
                kwargs[f.name] = JobState(value)
            elif f.name == "hyperparameters":
                kwargs[f.name] = json.loads(value)
            elif f.name == "cancel_requested":
                kwargs[f.name] = value not in ("0", "", "False")
            elif f.type in ("int",):
                kwargs[f.name] = int(float(value))
            elif f.type in ("float",):
                kwargs[f.name] = float(value)
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class JobEvent:
    type: str  # state | progress | eval | checkpoint | warning | log
    state: str = ""
    step: int = 0
    total_steps: int = 0
    train_loss: float = 0.0
    val_loss: float = 0.0
    learning_rate: float = 0.0
    throughput: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""
    time: float = field(default_factory=time.time)
    id: str = ""  # the stream position, set when read

    def to_fields(self) -> dict[str, str]:
        data = asdict(self)
        del data["id"]
        return {k: str(v) for k, v in data.items()}

    @classmethod
    def from_fields(cls, event_id: bytes | str, raw: dict) -> JobEvent:
        data = {_text(k): _text(v) for k, v in raw.items()}
        kwargs = {f.name: _CONVERT[f.type](data[f.name]) for f in fields(cls) if f.name in data and f.name != "id"}
        return cls(id=_text(event_id), **kwargs)


_CONVERT = {"int": lambda v: int(float(v)), "float": float, "str": str}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Report:
    """What a worker learns when it writes progress: whether it still owns the job, and whether to stop."""

    owned: bool
    cancel_requested: bool


# KEYS: job, events, active, adapter claim, index. ARGV: job id, hash fields (flattened), event fields, created_at
_CREATE = """
if redis.call('EXISTS', KEYS[4]) == 1 then return redis.call('GET', KEYS[4]) end
redis.call('SET', KEYS[4], ARGV[1])
local n = tonumber(ARGV[2])
local hash = {}
for i = 1, n do hash[i] = ARGV[2 + i] end
redis.call('HSET', KEYS[1], unpack(hash))
local event = {}
for i = 3 + n, #ARGV - 1 do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(event))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[#ARGV], ARGV[1])
return false
"""

# KEYS: job, lease, events. ARGV: attempt, worker, token, ttl ms, now. Idempotent: a retry after a lost
# reply finds its own lease and is told 'claimed' again.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'running' and redis.call('GET', KEYS[2]) == ARGV[3] then return 'claimed' end
if state ~= 'queued' then return 'stale' end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 'stale' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 'stale' end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2])
if tonumber(redis.call('HGET', KEYS[1], 'started_at') or '0') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[5])
end
redis.call('XADD', KEYS[3], '*', 'type', 'state', 'state', 'running', 'time', ARGV[5],
  'message', 'running on ' .. ARGV[2] .. ' (attempt ' .. ARGV[1] .. ')')
return 'claimed'
"""

# KEYS: lease. ARGV: token, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: job, lease, events. ARGV: token, report id, n hash values, hash..., then per event: n fields,
# fields... Idempotent: a retry after a lost reply (Redis restarting after it ran the script) finds its
# report id already written and adds nothing twice.
_REPORT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0, 0} end
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') == '1' and 1 or 0
if redis.call('HGET', KEYS[1], 'last_report') == ARGV[2] then return {1, cancel} end
local n = tonumber(ARGV[3])
local hash = {'last_report', ARGV[2]}
for i = 1, n do hash[2 + i] = ARGV[3 + i] end
redis.call('HSET', KEYS[1], unpack(hash))
local i = 4 + n
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  local event = {}
  for j = 1, count do event[j] = ARGV[i + j] end
  redis.call('XADD', KEYS[3], '*', unpack(event))
  i = i + count + 1
end
return {1, cancel}
"""

# KEYS: job, lease, events, active, adapter claim. ARGV: token (or '' to skip the lease check), hash..., event...
# Idempotent: a retry after a lost reply finds the job ended by the same token and returns 1 again.
_FINISH = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'finished_by') == ARGV[1] then return 1 end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'finished_by', ARGV[1])
local n = tonumber(ARGV[2])
local hash = {}
for i = 1, n do hash[i] = ARGV[2 + i] end
redis.call('HSET', KEYS[1], unpack(hash))
local event = {}
for i = 3 + n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], '*', unpack(event))
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
if redis.call('GET', KEYS[5]) == redis.call('HGET', KEYS[1], 'id') then redis.call('DEL', KEYS[5]) end
return 1
"""

# KEYS: job, events, active, adapter claim. ARGV: now
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1], 'cancel_requested', '1')
  redis.call('XADD', KEYS[2], '*', 'type', 'state', 'state', 'cancelled', 'time', ARGV[1],
    'message', 'cancelled before it started')
  redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
  if redis.call('GET', KEYS[4]) == redis.call('HGET', KEYS[1], 'id') then redis.call('DEL', KEYS[4]) end
  return 'done'
end
if state == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    redis.call('XADD', KEYS[2], '*', 'type', 'log', 'state', 'running', 'time', ARGV[1],
      'message', 'cancel requested; the job stops within a few steps')
  end
  return 'requested'
end
return state
"""

# KEYS: job, lease, events. ARGV: now, reason
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return false end
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) >= tonumber(ARGV[3]) then return -2 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'queued_at', ARGV[1])
redis.call('XADD', KEYS[3], '*', 'type', 'state', 'state', 'queued', 'time', ARGV[1], 'message', ARGV[2])
return attempt
"""


# KEYS: job, lease, events. ARGV: token, now, message, max attempts. Idempotent: a retry after a lost reply
# returns the attempt the first call made.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'released_by') == ARGV[1] then
  return tonumber(redis.call('HGET', KEYS[1], 'attempt'))
end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) >= tonumber(ARGV[4]) then return -2 end
redis.call('DEL', KEYS[2])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'queued_at', ARGV[2], 'released_by', ARGV[1])
redis.call('XADD', KEYS[3], '*', 'type', 'state', 'state', 'queued', 'time', ARGV[2], 'message', ARGV[3])
return attempt
"""


def _flatten(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = PREFIX):
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._report = client.register_script(_REPORT)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)

    # -- keys -----------------------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    def claim_key(self, adapter_name: str) -> str:
        return f"{self.prefix}:adapter-claim:{adapter_name}"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:jobs:active"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:jobs"

    def workers_key(self, name: str = "*") -> str:
        return f"{self.prefix}:worker:{name}"

    # -- the API --------------------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"ftjob-{secrets.token_hex(8)}"

    def create(self, record: JobRecord) -> JobRecord:
        """Store a QUEUED job, reserving its adapter name; ALREADY_EXISTS if a live job has that name."""
        record.created_at = record.created_at or time.time()
        record.queued_at = record.created_at
        hash_fields = _flatten(record.to_hash())
        event = JobEvent(
            "state", state="queued", total_steps=record.total_steps, message="queued", time=record.created_at
        )
        holder = self._create(
            keys=[
                self.job_key(record.id),
                self.events_key(record.id),
                self.active_key,
                self.claim_key(record.adapter_name),
                self.index_key,
            ],
            args=[record.id, len(hash_fields), *hash_fields, *_flatten(event.to_fields()), record.created_at],
        )
        if holder:
            raise AlreadyExists(
                f"adapter name {record.adapter_name!r} is taken by job {holder.decode()}, which has not finished"
            )
        return record

    def delete(self, job_id: str) -> None:
        """Remove a job that was never enqueued (its message could not be sent)."""
        record = self.get(job_id)
        pipe = self.redis.pipeline()
        pipe.delete(self.job_key(job_id), self.events_key(job_id), self.lease_key(job_id))
        pipe.srem(self.active_key, job_id)
        pipe.zrem(self.index_key, job_id)
        pipe.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
            1,
            self.claim_key(record.adapter_name),
            job_id,
        )
        pipe.execute()

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(self.job_key(job_id)) if JOB_ID_RE.match(job_id or "") else {}
        if not raw:
            raise NotFound(f"job {job_id!r} not found")
        return JobRecord.from_hash(raw)

    def list(self, state: JobState | None = None, limit: int = 100) -> list[JobRecord]:
        records = []
        start = 0
        while len(records) < limit:
            ids = self.redis.zrevrange(self.index_key, start, start + 4 * limit - 1)
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline()
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id.decode()))
            for raw in pipe.execute():
                if raw:
                    record = JobRecord.from_hash(raw)
                    if state is None or record.state == state:
                        records.append(record)
        return records[:limit]

    def cancel(self, job_id: str) -> JobRecord:
        self.get(job_id)  # NOT_FOUND for unknown or malformed ids before any key is built from them
        outcome = self._cancel(
            keys=[self.job_key(job_id), self.events_key(job_id), self.active_key, self._claim_key_of(job_id)],
            args=[time.time()],
        ).decode()
        if outcome == "missing":
            raise NotFound(f"job {job_id!r} not found")
        if outcome not in ("done", "requested"):
            raise FailedPrecondition(f"job {job_id!r} already {outcome}; only queued or running jobs can be cancelled")
        return self.get(job_id)

    def events(self, job_id: str, after: str = "0-0", count: int = 1000) -> list[JobEvent]:
        raw = self.redis.xrange(self.events_key(job_id), min=f"({after}" if after != "0-0" else "-", count=count)
        return [JobEvent.from_fields(event_id, fields_) for event_id, fields_ in raw]

    def all_events(self, job_id: str) -> Iterator[JobEvent]:
        after = "0-0"
        while batch := self.events(job_id, after):
            yield from batch
            after = batch[-1].id

    # -- the worker -----------------------------------------------------------------------------------

    def claim(self, job_id: str, attempt: int, worker: str, token: str, ttl_s: float) -> str:
        """'claimed', or 'stale' (a duplicate, a late redelivery, a cancelled job), or 'missing'."""
        return self._claim(
            keys=[self.job_key(job_id), self.lease_key(job_id), self.events_key(job_id)],
            args=[attempt, worker, token, int(ttl_s * 1000), time.time()],
        ).decode()

    def renew(self, job_id: str, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[token, int(ttl_s * 1000)]))

    def report(
        self, job_id: str, token: str, fields_: dict, events: list[JobEvent] = (), report_id: str | None = None
    ) -> Report:
        """Write progress while holding the lease, in one atomic step; tells the worker if it lost the job
        or should stop. Retrying with the same `report_id` writes nothing twice."""
        values = _flatten({k: str(v) for k, v in fields_.items()})
        event_args: list = []
        for event in events:
            flat = _flatten(event.to_fields())
            event_args += [len(flat), *flat]
        owned, cancel = self._report(
            keys=[self.job_key(job_id), self.lease_key(job_id), self.events_key(job_id)],
            args=[token, report_id or secrets.token_hex(8), len(values), *values, *event_args],
        )
        return Report(bool(owned), bool(cancel))

    def finish(self, job_id: str, token: str | None, state: JobState, fields_: dict, message: str) -> bool:
        """End the job (while holding the lease, unless `token` is None); False if another worker owns it."""
        now = time.time()
        values = _flatten({k: str(v) for k, v in ({"state": state.value, "finished_at": now} | fields_).items()})
        event = JobEvent(
            "state",
            state=state.value,
            step=int(fields_.get("step", 0)),
            total_steps=int(fields_.get("total_steps", 0)),
            train_loss=float(fields_.get("train_loss", 0.0)),
            val_loss=float(fields_.get("val_loss", 0.0)),
            message=message,
            time=now,
        )
        return bool(
            self._finish(
                keys=[
                    self.job_key(job_id),
                    self.lease_key(job_id),
                    self.events_key(job_id),
                    self.active_key,
                    self._claim_key_of(job_id),
                ],
                args=[token or "", len(values), *values, *_flatten(event.to_fields())],
            )
        )

    def release(self, job_id: str, token: str, message: str, max_attempts: int) -> int | None:
        """Hand a running job back to the queue at the next attempt (its worker is stopping); the caller
        sends the message. None if the lease was already lost; a job being cancelled ends CANCELLED and
        one out of attempts ends FAILED instead."""
        attempt = self._release(
            keys=[self.job_key(job_id), self.lease_key(job_id), self.events_key(job_id)],
            args=[token, time.time(), message, max_attempts],
        )
        return self._settle(job_id, token, attempt, max_attempts)

    def requeue_expired(self, max_attempts: int) -> list[tuple[str, int]]:
        """RUNNING jobs whose lease lapsed become QUEUED at the next attempt; returns (job id, attempt) to send."""
        requeued = []
        for raw_id in self.redis.smembers(self.active_key):
            job_id = raw_id.decode()
            attempt = self._requeue(
                keys=[self.job_key(job_id), self.lease_key(job_id), self.events_key(job_id)],
                args=[
                    time.time(),
                    "its worker stopped renewing the lease; queued again to resume from the checkpoint",
                    max_attempts,
                ],
            )
            if (settled := self._settle(job_id, None, attempt, max_attempts)) is not None:
                requeued.append((job_id, settled))
        return requeued

    def _settle(self, job_id: str, token: str | None, attempt, max_attempts: int) -> int | None:
        """Act on what a requeue or release script answered: an attempt to send, or the job's end."""
        if attempt == -1:  # it was being cancelled when its worker stopped
            self.finish(job_id, token, JobState.CANCELLED, {}, "cancelled (its worker stopped while it was)")
            return None
        if attempt == -2:
            message = (
                f"the job stopped its worker {max_attempts} times (finetune.max_attempts); "
                "it is failed so it cannot take down every worker in turn: check its data and hyperparameters"
            )
            self.finish(job_id, token, JobState.FAILED, {"error": message}, message)
            return None
        return int(attempt) if attempt else None

    def mark_dispatched(self, job_id: str, attempt: int) -> None:
        self.redis.hset(self.job_key(job_id), "dispatched_attempt", attempt)

    def undispatched(self, older_than_s: float) -> list[tuple[str, int]]:
        """QUEUED jobs whose current attempt's message was never sent (a crash or a broker error between
        the state change and the send): (job id, attempt) to send again. Duplicates are harmless."""
        found = []
        for raw_id in self.redis.smembers(self.active_key):
            raw = self.redis.hgetall(self.job_key(raw_id.decode()))
            if not raw:
                continue
            job = JobRecord.from_hash(raw)
            stale = time.time() - job.queued_at > older_than_s
            if job.state == JobState.QUEUED and job.dispatched_attempt != job.attempt and stale:
                found.append((job.id, job.attempt))
        return found

    def register_worker(self, name: str, info: dict, ttl_s: float) -> None:
        self.redis.set(self.workers_key(name), json.dumps(info), px=int(ttl_s * 1000))

    def workers(self) -> list[dict]:
        keys = list(self.redis.scan_iter(self.workers_key(), count=100))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    def _claim_key_of(self, job_id: str) -> str:
        adapter = self.redis.hget(self.job_key(job_id), "adapter_name")
        return self.claim_key(adapter.decode() if adapter else "-")
