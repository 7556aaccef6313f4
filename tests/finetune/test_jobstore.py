"""The job store's state machine, against a real Redis: claims, leases, hand-backs, sweeps, limits."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from services.finetune.jobs import Expired, JobEvent, JobRecord, JobState, JobStore
from services.finetune.runner import WorkerContext
from services.finetune.training import checkpoint
from services.finetune.worker import Maintenance
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from shared.settings import Settings


@pytest.fixture
def store(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    return JobStore(client, prefix=f"test-{time.time_ns()}")


def new_job(store: JobStore, adapter: str = "a") -> JobRecord:
    return store.create(JobRecord(store.new_id(), "llm", "tiny-llm", "ds", adapter, {}, total_steps=10))


def states(store: JobStore, job_id: str) -> list[str]:
    return [e.state for e in store.all_events(job_id) if e.type == "state"]


def test_a_job_is_claimed_once_per_attempt_and_duplicates_are_stale(store):
    job = new_job(store)
    assert store.claim(job.id, 1, "w1", "t1", 30) == "claimed"
    assert store.claim(job.id, 1, "w2", "t2", 30) == "stale"  # a duplicate message: never two runs
    assert store.claim(job.id, 2, "w2", "t2", 30) == "stale"  # an attempt that does not exist yet
    assert store.report(job.id, "t2", {"step": 1}).owned is False  # only the lease holder writes
    assert store.report(job.id, "t1", {"step": 1}).owned is True


def test_an_adapter_name_is_held_until_its_job_ends(store):
    job = new_job(store, "held")
    with pytest.raises(AlreadyExists, match=job.id):
        new_job(store, "held")
    assert store.claim(job.id, 1, "w", "t", 30) == "claimed"
    assert store.finish(job.id, "t", JobState.FAILED, {"error": "x"}, "x")
    new_job(store, "held")


def test_a_release_is_idempotent_and_a_cancelled_job_is_not_released_but_ends(store):
    job = new_job(store)
    store.claim(job.id, 1, "w", "t", 30)
    assert store.release(job.id, "t", "stopping", max_attempts=5) == 2
    assert store.release(job.id, "t", "stopping", max_attempts=5) == 2, "a retried release answers the same"
    assert store.get(job.id).state == JobState.QUEUED
    other = new_job(store, "b")
    store.claim(other.id, 1, "w", "t2", 30)
    store.cancel(other.id)  # requested while running...
    assert store.release(other.id, "t2", "stopping", max_attempts=5) is None  # ...so it ends, not requeued
    assert store.get(other.id).state == JobState.CANCELLED


def test_every_worker_write_retried_after_a_lost_reply_takes_effect_once(store):
    """Redis can run a script and restart before its reply arrives; the worker then retries the same
    call. The retry must neither double an event nor make the worker think it lost the job."""
    job = new_job(store)
    event = JobEvent("progress", state="running", step=1, total_steps=10, message="step 1")
    assert store.claim(job.id, 1, "w", "t", 30) == "claimed"
    assert store.claim(job.id, 1, "w", "t", 30) == "claimed", "a retried claim finds its own lease"
    for _ in range(2):
        assert store.report(job.id, "t", {"step": 1}, [event], report_id="t:1").owned
    store.report(job.id, "t", {"step": 2}, [event], report_id="t:2")
    assert [e.type for e in store.all_events(job.id)].count("progress") == 2
    for _ in range(2):
        assert store.finish(job.id, "t", JobState.SUCCEEDED, {"step": 10}, "done"), "a retried finish still owns it"
    assert states(store, job.id) == ["queued", "running", "succeeded"]
    assert store.finish(job.id, "other", JobState.FAILED, {}, "late") is False


def test_a_lapsed_lease_is_requeued_until_the_attempts_run_out(store):
    job = new_job(store)
    store.claim(job.id, 1, "w", "t", 0.05)
    time.sleep(0.1)  # let the 50 ms lease lapse (the sweeper's condition, not a wait for other work)
    assert store.requeue_expired(max_attempts=2) == Expired(requeued=[(job.id, 2)])
    assert store.claim(job.id, 2, "w", "t", 0.05) == "claimed"
    time.sleep(0.1)
    assert store.requeue_expired(max_attempts=2) == Expired(ended=[job.id])
    record = store.get(job.id)
    assert record.state == JobState.FAILED and "2 times" in record.error
    assert states(store, job.id) == ["queued", "running", "queued", "running", "failed"]


def test_an_attempt_whose_message_was_never_sent_is_found_by_the_sweeper(store):
    job = new_job(store)
    assert store.undispatched(older_than_s=0) == [(job.id, 1)]
    store.mark_dispatched(job.id, 1)
    assert store.undispatched(older_than_s=0) == []


def test_cancelling_twice_or_a_finished_job_is_a_failed_precondition(store):
    job = new_job(store)
    assert store.cancel(job.id).state == JobState.CANCELLED
    with pytest.raises(FailedPrecondition, match="already cancelled"):
        store.cancel(job.id)


@pytest.mark.parametrize("job_id", ["", "ftjob-0", "ftjob-0123456789abcdef:events", "../x"])
def test_malformed_or_unknown_ids_are_not_found(store, job_id):
    with pytest.raises(NotFound):
        store.get(job_id)
    with pytest.raises(NotFound):
        store.cancel(job_id)


def owned_job(store: JobStore, owner: str, adapter: str, limit: int | None = None) -> JobRecord:
    record = JobRecord(store.new_id(), "llm", "tiny-llm", "ds", adapter, {}, total_steps=10, owner=owner)
    return store.create(record, max_active=limit)


def test_concurrent_creates_never_overshoot_an_owners_quota(store):
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: _try(lambda: owned_job(store, "bob", f"q{i}", limit=3)), range(8)))
    created = [o for o in outcomes if isinstance(o, JobRecord)]
    assert len(created) == 3
    assert all(isinstance(o, ResourceExhausted) and "the limit is 3" in o.message for o in outcomes if o not in created)
    owned_job(store, "alice", "other-owner", limit=3)  # another key's quota is its own
    store.cancel(created[0].id)
    store.claim(created[1].id, 1, "w", "t", 30)
    store.finish(created[1].id, "t", JobState.SUCCEEDED, {}, "done")
    owned_job(store, "bob", "freed-1", limit=3)  # a cancelled and a finished job free their places
    owned_job(store, "bob", "freed-2", limit=3)
    with pytest.raises(ResourceExhausted, match="already has 3 jobs"):
        owned_job(store, "bob", "over", limit=3)


def test_listing_by_owner_shows_only_that_owners_jobs(store):
    mine = {owned_job(store, "alice", f"mine-{i}").id for i in range(3)}
    owned_job(store, "bob", "theirs")
    assert {j.id for j in store.list(owner="alice")} == mine
    assert len(store.list()) == 4


def test_a_job_event_stream_is_trimmed_to_about_its_limit(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    store = JobStore(client, prefix=f"test-{time.time_ns()}", max_events=100)
    job = new_job(store)
    store.claim(job.id, 1, "w", "t", 30)
    event = JobEvent("progress", state="running", step=1, total_steps=10)
    for _ in range(50):
        assert store.report(job.id, "t", {"step": 1}, [event] * 10).owned
    length = client.xlen(store.events_key(job.id))
    assert 100 <= length <= 300, length  # MAXLEN ~ trims whole stream nodes (100 entries each)


def test_finished_jobs_expire_after_the_cutoff_and_unfinished_ones_stay(store):
    done, cancelled, queued = owned_job(store, "alice", "done"), new_job(store, "c"), owned_job(store, "alice", "q")
    store.claim(done.id, 1, "w", "t", 30)
    store.finish(done.id, "t", JobState.SUCCEEDED, {}, "done")
    store.cancel(cancelled.id)
    ended_by = time.time()
    assert store.expire_finished(cutoff=ended_by - 3600) == []  # ended after the cutoff: kept
    assert sorted(store.expire_finished(cutoff=ended_by + 3600)) == sorted([done.id, cancelled.id])
    for job_id in (done.id, cancelled.id):
        with pytest.raises(NotFound):
            store.get(job_id)
        assert store.events(job_id) == []
    assert [j.id for j in store.list()] == [queued.id] == [j.id for j in store.list(owner="alice")]
    assert store.get(queued.id).state == JobState.QUEUED
    assert store.expire_finished(cutoff=ended_by + 3600) == []


def _try(action):
    try:
        return action()
    except ResourceExhausted as exc:
        return exc


def test_the_sweeper_removes_the_checkpoints_of_a_job_it_fails(store, tmp_path):
    """A job whose last allowed attempt lost its worker ends FAILED in the sweep; nothing resumes it, so its
    checkpoints go with it (while a requeued job keeps them to resume from)."""
    settings = Settings.model_validate({"data_dir": str(tmp_path), "finetune": {"max_attempts": 2}})
    sent = []
    context = WorkerContext(settings, store, "w", lambda job_id, attempt: sent.append((job_id, attempt)))
    job = new_job(store)
    saved = checkpoint.attempt_folder(settings.jobs_dir / job.id, 1)
    saved.mkdir(parents=True)
    store.claim(job.id, 1, "w", "t", 0.05)
    time.sleep(0.1)  # let the 50 ms lease lapse (the sweeper's condition, not a wait for other work)
    Maintenance(context, {}).sweep()
    assert sent == [(job.id, 2)] and saved.is_dir(), "requeued: the next attempt resumes from it"
    store.claim(job.id, 2, "w", "t2", 0.05)
    time.sleep(0.1)
    Maintenance(context, {}).sweep()
    assert store.get(job.id).state == JobState.FAILED
    assert not (settings.jobs_dir / job.id / checkpoint.CHECKPOINTS).exists()
