"""The job store's state machine, against a real Redis: claims, leases, hand-backs, sweeps, limits."""

from __future__ import annotations

import time

import pytest
import redis

from services.finetune.jobs import JobEvent, JobRecord, JobState, JobStore
from shared.errors import AlreadyExists, FailedPrecondition, NotFound


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
    assert store.requeue_expired(max_attempts=2) == [(job.id, 2)]
    assert store.claim(job.id, 2, "w", "t", 0.05) == "claimed"
    time.sleep(0.1)
    assert store.requeue_expired(max_attempts=2) == []
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
