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

Each job has an event stream (`XADD`): WatchJob replays it from the start and then follows it live;
ListJobEvents pages through it newest first (`XREVRANGE`).
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

from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

PREFIX = "modelworks"
JOB_ID_RE = re.compile(r"^ftjob-[0-9a-f]{16}$")
EVENT_ID_RE = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")  # a stream entry id: milliseconds-sequence
EVENT_TYPES = ("state", "progress", "eval", "checkpoint", "warning", "log")
MAX_STREAM_ID_PART = 2**64 - 1


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class AdapterNameTaken(AlreadyExists):
    """An unfinished job will write this adapter name; `holder` is its id (the API hides it from other keys)."""

    def __init__(self, adapter_name: str, holder: str):
        self.adapter_name, self.holder = adapter_name, holder
        super().__init__(f"adapter name {adapter_name!r} is taken by job {holder}, which has not finished")

    def hidden(self) -> AlreadyExists:
        return AlreadyExists(
            f"adapter name {self.adapter_name!r} is reserved by another key's job that has not finished; pick "
            "another name"
        )


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
    owner: str = ""  # the name of the API key that created it (shared.auth.Caller.name)
    validation_dataset_id: str = ""  # "": validates on a split of the training dataset (and older records)
    test_loss: float = 0.0  # SUCCEEDED with a test_fraction: the held-out records' loss
    test_perplexity: float = 0.0  # LLM jobs: exp(test_loss)

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
    type: str  # one of EVENT_TYPES
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
    test_loss: float = 0.0
    test_perplexity: float = 0.0
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


# KEYS: job, events, active, adapter claim, index, the owner's active, the owner's index. ARGV: job id,
# created_at, the owner's limit of unfinished jobs ('' for none), max events, n, hash fields (flattened),
# event fields.
# Returns false (created), {'taken', job id holding the adapter name} or {'full', the owner's unfinished jobs}.
_CREATE = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {'taken', redis.call('GET', KEYS[4])} end
local active = redis.call('SCARD', KEYS[6])
if ARGV[3] ~= '' and active >= tonumber(ARGV[3]) then return {'full', active} end
redis.call('SET', KEYS[4], ARGV[1])
local n = tonumber(ARGV[5])
local hash = {}
for i = 1, n do hash[i] = ARGV[5 + i] end
redis.call('HSET', KEYS[1], unpack(hash))
local event = {}
for i = 6 + n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
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

# KEYS: job, lease, events. ARGV: token, report id, max events, n hash values, hash..., then per event:
# n fields, fields... Idempotent: a retry after a lost reply (Redis restarting after it ran the script)
# finds its report id already written and adds nothing twice.
_REPORT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0, 0} end
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') == '1' and 1 or 0
if redis.call('HGET', KEYS[1], 'last_report') == ARGV[2] then return {1, cancel} end
local n = tonumber(ARGV[4])
local hash = {'last_report', ARGV[2]}
for i = 1, n do hash[2 + i] = ARGV[4 + i] end
redis.call('HSET', KEYS[1], unpack(hash))
local i = 5 + n
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  local event = {}
  for j = 1, count do event[j] = ARGV[i + j] end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(event))
  i = i + count + 1
end
return {1, cancel}
"""

# KEYS: job, lease, events, active, adapter claim, the owner's active. ARGV: token (or '' to skip the lease
# check), max events, n, hash..., event... Idempotent: a retry after a lost reply finds the job ended by
# the same token and returns 1 again.
_FINISH = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'finished_by') == ARGV[1] then return 1 end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'finished_by', ARGV[1])
local n = tonumber(ARGV[3])
local hash = {}
for i = 1, n do hash[i] = ARGV[3 + i] end
redis.call('HSET', KEYS[1], unpack(hash))
local event = {}
for i = 4 + n, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', unpack(event))
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
redis.call('SREM', KEYS[6], redis.call('HGET', KEYS[1], 'id'))
if redis.call('GET', KEYS[5]) == redis.call('HGET', KEYS[1], 'id') then redis.call('DEL', KEYS[5]) end
return 1
"""

# KEYS: job, events, active, adapter claim, the owner's active. ARGV: now, max events
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1], 'cancel_requested', '1')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', 'state', 'state', 'cancelled', 'time', ARGV[1],
    'message', 'cancelled before it started')
  redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'id'))
  redis.call('SREM', KEYS[5], redis.call('HGET', KEYS[1], 'id'))
  if redis.call('GET', KEYS[4]) == redis.call('HGET', KEYS[1], 'id') then redis.call('DEL', KEYS[4]) end
  return 'done'
end
if state == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', 'log', 'state', 'running', 'time', ARGV[1],
      'message', 'cancel requested; the job stops within a few steps')
  end
  return 'requested'
end
return state
"""

# KEYS: job, lease, events. ARGV: now, reason, max attempts
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


# KEYS: job, events, lease, index, the owner's index. ARGV: job id, cutoff. Removes a job that ended before
# the cutoff (or an index entry whose record is gone); an unfinished job, or one that ended later, stays.
_EXPIRE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' then return 0 end
if state and tonumber(redis.call('HGET', KEYS[1], 'finished_at') or '0') >= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
"""


def _flatten(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


def parse_event_id(event_id: str) -> tuple[int, int]:
    """(milliseconds, sequence) of a stream entry id; InvalidArgument for anything Redis would refuse."""
    match = EVENT_ID_RE.match(event_id)
    parts = (int(match[1]), int(match[2])) if match else ()
    if not parts or max(parts) > MAX_STREAM_ID_PART:
        raise InvalidArgument(f"event id {event_id!r} is not an event_id (like 1700000000000-0) from a JobEvent")
    return parts


@dataclass
class EventPage:
    """Events newest first, and whether older ones (of the type asked for) remain."""

    events: list[JobEvent]
    has_more: bool


@dataclass
class Expired:
    """What one sweep for lapsed leases did: attempts to send, and jobs it ended."""

    requeued: list[tuple[str, int]] = field(default_factory=list)  # (job id, attempt)
    ended: list[str] = field(default_factory=list)


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = PREFIX, max_events: int = 100_000):
        self.redis = client
        self.prefix = prefix
        self.max_events = max_events  # per job stream, trimmed approximately (finetune.max_events_per_job)
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._report = client.register_script(_REPORT)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)
        self._expire = client.register_script(_EXPIRE)

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

    def owner_active_key(self, owner: str) -> str:
        """The unfinished jobs of one API key (names are `[A-Za-z0-9._-]`, safe in a key)."""
        return f"{self.prefix}:jobs:active-of:{owner}"

    def owner_index_key(self, owner: str) -> str:
        return f"{self.prefix}:jobs:of:{owner}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:jobs"

    def workers_key(self, name: str = "*") -> str:
        return f"{self.prefix}:worker:{name}"

    # -- the API --------------------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"ftjob-{secrets.token_hex(8)}"

    def create(
        self, record: JobRecord, max_active: int | None = None, limit_setting: str = "finetune.max_queued_jobs"
    ) -> JobRecord:
        """Store a QUEUED job, reserving its adapter name; ALREADY_EXISTS if a live job has that name, and
        RESOURCE_EXHAUSTED if its owner already has `max_active` jobs queued or running (checked in the
        same atomic step, so concurrent creates cannot overshoot)."""
        record.created_at = record.created_at or time.time()
        record.queued_at = record.created_at
        hash_fields = _flatten(record.to_hash())
        event = JobEvent(
            "state", state="queued", total_steps=record.total_steps, message="queued", time=record.created_at
        )
        refused = self._create(
            keys=[
                self.job_key(record.id),
                self.events_key(record.id),
                self.active_key,
                self.claim_key(record.adapter_name),
                self.index_key,
                self.owner_active_key(record.owner),
                self.owner_index_key(record.owner),
            ],
            args=[
                record.id,
                record.created_at,
                "" if max_active is None else max_active,
                self.max_events,
                len(hash_fields),
                *hash_fields,
                *_flatten(event.to_fields()),
            ],
        )
        if refused:
            reason, detail = refused
            if reason == b"taken":
                raise AdapterNameTaken(record.adapter_name, detail.decode())
            raise ResourceExhausted(
                f"API key {record.owner!r} already has {detail} jobs queued or running; the limit is {max_active} "
                f"({limit_setting}): wait for one to end or cancel one"
            )
        return record

    def delete(self, job_id: str) -> None:
        """Remove a job that was never enqueued (its message could not be sent)."""
        record = self.get(job_id)
        pipe = self.redis.pipeline()
        pipe.delete(self.job_key(job_id), self.events_key(job_id), self.lease_key(job_id))
        pipe.srem(self.active_key, job_id)
        pipe.srem(self.owner_active_key(record.owner), job_id)
        pipe.zrem(self.index_key, job_id)
        pipe.zrem(self.owner_index_key(record.owner), job_id)
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

    def list(self, state: JobState | None = None, limit: int = 100, owner: str | None = None) -> list[JobRecord]:
        """Newest first, of one state and one owner when given."""
        index = self.index_key if owner is None else self.owner_index_key(owner)
        records = []
        start = 0
        while len(records) < limit:
            ids = self.redis.zrevrange(index, start, start + 4 * limit - 1)
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
        claim_key, owner_active_key = self._held_keys_of(job_id)
        outcome = self._cancel(
            keys=[self.job_key(job_id), self.events_key(job_id), self.active_key, claim_key, owner_active_key],
            args=[time.time(), self.max_events],
        ).decode()
        if outcome == "missing":
            raise NotFound(f"job {job_id!r} not found")
        if outcome not in ("done", "requested"):
            raise FailedPrecondition(f"job {job_id!r} already {outcome}; only queued or running jobs can be cancelled")
        return self.get(job_id)

    def unfinished_using(self, dataset_id: str) -> list[str]:
        """The queued or running jobs that will read this dataset, to train or to validate on."""
        ids = [raw.decode() for raw in self.redis.smembers(self.active_key)]
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hmget(self.job_key(job_id), "dataset_id", "validation_dataset_id")
        return [job_id for job_id, used in zip(ids, pipe.execute(), strict=True) if dataset_id.encode() in used]

    def expire_finished(self, cutoff: float, batch: int = 500) -> list[str]:
        """Remove every job that ended before `cutoff` (record, events, index entry); returns their ids so
        the caller can remove their folders. Only jobs created before the cutoff can qualify."""
        expired: list[str] = []
        offset = 0
        while ids := self.redis.zrangebyscore(self.index_key, "-inf", cutoff, start=offset, num=batch):
            removed = [job_id.decode() for job_id in ids if self._expire_one(job_id.decode(), cutoff)]
            expired += removed
            offset += len(ids) - len(removed)
        return expired

    def _expire_one(self, job_id: str, cutoff: float) -> bool:
        owner = self.redis.hget(self.job_key(job_id), "owner")
        keys = [
            self.job_key(job_id),
            self.events_key(job_id),
            self.lease_key(job_id),
            self.index_key,
            self.owner_index_key(owner.decode() if owner else ""),
        ]
        return bool(self._expire(keys=keys, args=[job_id, cutoff]))

    def events(self, job_id: str, after: str = "0-0", count: int = 1000) -> list[JobEvent]:
        raw = self.redis.xrange(self.events_key(job_id), min=f"({after}" if after != "0-0" else "-", count=count)
        return [JobEvent.from_fields(event_id, fields_) for event_id, fields_ in raw]

    def events_newest_first(self, job_id: str, limit: int, before: str = "", event_type: str = "") -> EventPage:
        """Up to `limit` events older than the event id `before` (when given), of `event_type` (when given),
        newest first. Filtered here, so a rare type is found by scanning back in batches."""
        if before and parse_event_id(before) == (0, 0):
            return EventPage([], False)  # nothing is older; Redis refuses the exclusive bound `(0-0`
        newest, found = f"({before}" if before else "+", []
        batch = limit + 1 if not event_type else max(limit + 1, 500)
        while len(found) <= limit:
            raw = self.redis.xrevrange(self.events_key(job_id), max=newest, min="-", count=batch)
            events = [JobEvent.from_fields(event_id, fields_) for event_id, fields_ in raw]
            found += [e for e in events if not event_type or e.type == event_type]
            if len(raw) < batch:
                break
            newest = f"({events[-1].id}"
        return EventPage(found[:limit], len(found) > limit)

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
            args=[token, report_id or secrets.token_hex(8), self.max_events, len(values), *values, *event_args],
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
            test_loss=float(fields_.get("test_loss", 0.0)),
            test_perplexity=float(fields_.get("test_perplexity", 0.0)),
            message=message,
            time=now,
        )
        claim_key, owner_active_key = self._held_keys_of(job_id)
        return bool(
            self._finish(
                keys=[
                    self.job_key(job_id),
                    self.lease_key(job_id),
                    self.events_key(job_id),
                    self.active_key,
                    claim_key,
                    owner_active_key,
                ],
                args=[token or "", self.max_events, len(values), *values, *_flatten(event.to_fields())],
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

    def requeue_expired(self, max_attempts: int) -> Expired:
        """RUNNING jobs whose lease lapsed become QUEUED at the next attempt (to send), or end: CANCELLED if
        they were being cancelled, FAILED when out of attempts (their checkpoints are the caller's to remove)."""
        expired = Expired()
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
            if not attempt:
                continue  # its lease holds, or it is not RUNNING
            if (settled := self._settle(job_id, None, attempt, max_attempts)) is not None:
                expired.requeued.append((job_id, settled))
            else:
                expired.ended.append(job_id)
        return expired

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
        self.redis.hset(self.job_key(job_id), mapping={"dispatched_attempt": attempt, "dispatched_at": time.time()})

    def undispatched(self, older_than_s: float, sent_before_s: float | None = None) -> list[tuple[str, int]]:
        """QUEUED jobs whose current attempt's message was never sent (a crash or a broker error between
        the state change and the send) for `older_than_s`, and, with `sent_before_s`, those whose message
        went out longer ago than that and is still unclaimed (the caller checks whether it still waits in
        the queue: if not, a worker took it and died before claiming). (job id, attempt) to send again;
        a duplicate is harmless, as claim runs each attempt once."""
        found, now = [], time.time()
        for raw_id in self.redis.smembers(self.active_key):
            raw = self.redis.hgetall(self.job_key(raw_id.decode()))
            if not raw:
                continue
            job = JobRecord.from_hash(raw)
            if job.state != JobState.QUEUED:
                continue
            if job.dispatched_attempt != job.attempt:
                if now - job.queued_at > older_than_s:
                    found.append((job.id, job.attempt))
            elif sent_before_s is not None and now - float(raw.get(b"dispatched_at", 0)) > sent_before_s:
                found.append((job.id, job.attempt))
        return found

    def register_worker(self, name: str, info: dict, ttl_s: float) -> None:
        self.redis.set(self.workers_key(name), json.dumps(info), px=int(ttl_s * 1000))

    def workers(self) -> list[dict]:
        keys = list(self.redis.scan_iter(self.workers_key(), count=100))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    def _held_keys_of(self, job_id: str) -> tuple[str, str]:
        """The keys an unfinished job holds besides its own: its adapter name's claim, its owner's active set."""
        raw = self.redis.hmget(self.job_key(job_id), ["adapter_name", "owner"])
        adapter, owner = (value.decode() if value else "" for value in raw)
        return self.claim_key(adapter or "-"), self.owner_active_key(owner)
