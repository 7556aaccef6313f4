"""Jobs survive what kills processes: a worker killed mid-job or paused past its lease, lost and duplicate
messages, a Redis restart.

Each test has its own Redis, API and queue, so killing things here disturbs no other test.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import grpc
import pytest
import redis

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from services.finetune.jobs import JobStore
from tests.conftest import TEST_SERVER_CONFIG
from tests.finetune.conftest import FAST_LEASES, finetune_config, job_request, wait_for_event, watch
from tests.harness import spawn_service, spawn_worker, start_redis, wait_for


@pytest.fixture
def system(data_dir, smollm2, tmp_path, request):
    """A private Redis and fine-tune API; `system.worker(name)` starts workers on its queue. Parametrize
    indirectly with a dict to override finetune settings."""
    overrides = getattr(request, "param", {})

    class System:
        def __init__(self):
            self.redis = start_redis(tmp_path / "redis")
            self.config = finetune_config(data_dir, self.redis.url, queue=f"q-{tmp_path.name}", **overrides)
            self.api = spawn_service("finetune", tmp_path / "api", self.config)
            self.channel = grpc.insecure_channel(self.api.address)
            self.stub = finetune_pb2_grpc.FineTuneServiceStub(self.channel)
            self.jobs = JobStore(redis.Redis.from_url(self.redis.url))
            self.workers = []

        def worker(self, name: str):
            process = spawn_worker(tmp_path / "workers", self.config, name)
            self.workers.append(process)
            return process

        def expire_lease(self, job_id: str) -> None:
            """What the lease's TTL does once nothing renews it, now."""
            assert self.jobs.redis.delete(self.jobs.lease_key(job_id)) == 1, "the job held a lease"

        def checkpoints(self, job_id: str) -> Path:
            return Path(self.config["data_dir"]) / "jobs" / job_id / "checkpoints"

        def close(self):
            for process in self.workers:
                process.kill()
            self.jobs.redis.close()
            self.channel.close()
            self.api.stop()
            self.redis.stop()

    built = System()
    yield built
    built.close()


def running_events(events) -> list:
    return [e for e in events if e.type == "state" and e.state == pb.JOB_STATE_RUNNING]


def once_running_on(worker: str, predicate):
    """A predicate for `wait_for_event`: `predicate`, on events after the job started running on `worker`."""
    seen = []

    def check(event) -> bool:
        if event.type == "state" and event.message.startswith(f"running on {worker} "):
            seen.append(event)
            return False
        return bool(seen) and predicate(event)

    return check


@pytest.mark.parametrize("system", [{"lease_ttl_s": 120}], indirect=True)
def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes_from_its_checkpoint(system):
    """Two attempts by construction: a live worker's lease (two minutes, renewed every second) cannot lapse
    on a busy machine, and the killed worker's is run out by the test, as its TTL would once nothing renews it."""
    first = system.worker("first")
    job = system.stub.CreateJob(job_request("llm", "lora", "survivor", max_steps=300, save_steps=10))
    checkpoint = wait_for_event(system.stub, job.id, lambda e: e.type == "checkpoint" and e.step >= 20)
    first.kill()  # SIGKILL: no chance to hand the job back
    system.expire_lease(job.id)
    system.worker("second")
    events = watch(system.stub, job.id)
    final = system.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.attempt == 2 and final.worker == "second"
    assert final.resumed_from_step >= checkpoint.step
    assert [e.message.split(" (")[0] for e in running_events(events)] == ["running on first", "running on second"]
    assert any("stopped renewing the lease" in e.message for e in events)
    resumed = next(e for e in events if e.message.startswith("resumed from the checkpoint"))
    second_run = events[events.index(resumed) :]
    first_step = next(e.step for e in second_run if e.type == "progress")
    assert first_step == final.resumed_from_step + 1, "the second worker went on from the checkpoint, not step 1"


def test_duplicate_messages_for_a_running_job_are_dropped_never_run_twice(system):
    from services.finetune.queue import enqueue, make_celery
    from shared.settings import Settings

    workers = [system.worker("one"), system.worker("two")]
    job = system.stub.CreateJob(job_request("llm", "lora", "single-run", max_steps=120))
    wait_for_event(system.stub, job.id, lambda e: e.type == "progress")
    app = make_celery(Settings.model_validate(system.config))
    for _ in range(3):  # as a redelivery after a visibility timeout would
        enqueue(app, system.config["finetune"]["queue"], job.id, 1)
    events = watch(system.stub, job.id)
    assert system.stub.GetJob(pb.GetJobRequest(id=job.id)).state == pb.JOB_STATE_SUCCEEDED
    assert len(running_events(events)) == 1
    steps = [e.step for e in events if e.type == "progress"]
    assert steps == list(range(1, 121)), "one run: every step once, in order"
    assert sum(log.logs().count("message dropped") for log in workers) >= 3


def test_a_redis_restart_mid_job_loses_no_job_and_no_event(system):
    system.worker("steady")
    job = system.stub.CreateJob(job_request("llm", "lora", "through-restart", max_steps=150, save_steps=50))
    before = []
    for event in system.stub.WatchJob(pb.WatchJobRequest(id=job.id)):
        before.append(event)
        if event.type == "progress" and event.step >= 10:
            break
    system.redis.restart()  # AOF with fsync always: every acknowledged write is on disk
    events = watch(system.stub, job.id)
    final = system.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert events[: len(before)] == before, "every event read before the restart is still there, in order"
    steps = [e.step for e in events if e.type == "progress"]
    assert steps == list(range(1, 151)), "and none written after it was lost or doubled"
    assert "through-restart" in {a.name for a in system.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}


@pytest.mark.parametrize("system", [{"progress_interval_s": 3600}], indirect=True)
def test_progress_is_written_in_batches_that_hold_every_step(system):
    """With no evaluation or checkpoint in between, progress is written at the first step and the last."""
    system.worker("batched")
    job = system.stub.CreateJob(
        job_request("llm", "lora", "batched", max_steps=150, validation_fraction=0.0, save_steps=1000)
    )
    events = watch(system.stub, job.id)
    assert system.stub.GetJob(pb.GetJobRequest(id=job.id)).state == pb.JOB_STATE_SUCCEEDED
    progress = [e for e in events if e.type == "progress"]
    assert [e.step for e in progress] == list(range(1, 151)), "every step, in order"
    written_ms = int(progress[1].event_id.split("-")[0])  # a stream id's time part: when Redis took it
    assert written_ms >= int(progress[-1].time * 1000), "step 2 went to Redis with the last step, in one write"


@pytest.mark.parametrize("system", [{"progress_interval_s": 0.5}], indirect=True)
def test_a_cancel_lands_at_the_next_batched_write(system):
    system.worker("batched")
    long = system.stub.CreateJob(job_request("llm", "lora", "batched-cancel", max_steps=100_000))
    wait_for_event(system.stub, long.id, lambda e: e.type == "progress")
    system.stub.CancelJob(pb.CancelJobRequest(id=long.id))
    watch(system.stub, long.id)
    assert system.stub.GetJob(pb.GetJobRequest(id=long.id)).state == pb.JOB_STATE_CANCELLED


def test_a_job_whose_message_was_lost_is_sent_again_by_the_sweeper(system):
    import redis

    job = system.stub.CreateJob(job_request("llm", "lora", "resent", max_steps=3))
    client = redis.Redis.from_url(system.redis.url)
    queue = system.config["finetune"]["queue"]
    assert client.delete(queue) == 1, "the message was in the queue"
    client.hset(f"modelworks:job:{job.id}", "dispatched_attempt", 0)  # as if the send never happened
    system.worker("sweeper")
    watch(system.stub, job.id)
    assert system.stub.GetJob(pb.GetJobRequest(id=job.id)).state == pb.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize("system", [{"max_attempts": 1}], indirect=True)
def test_a_job_that_keeps_killing_its_workers_is_failed_not_retried_forever(system):
    first = system.worker("victim")
    job = system.stub.CreateJob(job_request("llm", "lora", "poison", max_steps=100_000))
    wait_for_event(system.stub, job.id, lambda e: e.type == "progress")
    first.kill()
    system.worker("next")
    watch(system.stub, job.id)
    final = system.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_FAILED and "finetune.max_attempts" in final.error


@pytest.mark.parametrize("system", [{"lease_ttl_s": 120}], indirect=True)
def test_a_worker_paused_past_its_lease_stops_and_leaves_the_resumed_attempts_checkpoints_alone(system):
    """Long leases, so only the paused worker's runs out: the test runs it out while the worker is stopped."""
    first = system.worker("first")
    job = system.stub.CreateJob(job_request("llm", "lora", "paused", max_steps=100_000, save_steps=5))
    wait_for_event(system.stub, job.id, lambda e: e.type == "checkpoint")
    os.kill(first.process.pid, signal.SIGSTOP)  # a VM freeze, a partition
    system.expire_lease(job.id)  # what a pause longer than the lease does
    try:
        system.worker("second")
        wait_for_event(system.stub, job.id, once_running_on("second", lambda e: e.type == "checkpoint"))
    finally:
        os.kill(first.process.pid, signal.SIGCONT)
    wait_for(lambda: "another worker owns this job now" in first.logs(), 120, "the woken worker to stop its run")
    resumed_from = system.stub.GetJob(pb.GetJobRequest(id=job.id)).resumed_from_step
    stale = system.checkpoints(job.id) / "attempt-1"
    late = [p for p in stale.glob("step-*") if int(p.name.removeprefix("step-")) > resumed_from]
    assert not late, f"the woken worker wrote {late} after the job was resumed elsewhere"
    newest = wait_for_event(system.stub, job.id, once_running_on("second", lambda e: e.type == "checkpoint"))
    assert system.stub.CancelJob(pb.CancelJobRequest(id=job.id)).state == pb.JOB_STATE_RUNNING
    events = watch(system.stub, job.id)
    final = system.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_CANCELLED and final.worker == "second" and final.attempt == 2
    assert final.step >= newest.step, "the second worker trained on, undisturbed"
    assert [e.message.split(" (")[0] for e in running_events(events)] == ["running on first", "running on second"]
    wait_for(lambda: not system.checkpoints(job.id).exists(), 60, "a cancelled job's checkpoints to go")
    assert (system.checkpoints(job.id).parent / "tensorboard").is_dir(), "but keeps its TensorBoard events"


def test_a_job_whose_message_was_taken_and_lost_is_sent_again_after_a_lease(system):
    """The message left the queue (as when a worker takes it and dies before claiming the job) but the job
    stays QUEUED with its message sent: a worker's sweep sends it again once it is a lease old."""
    job = system.stub.CreateJob(job_request("llm", "lora", "taken-and-lost", max_steps=3))
    assert system.jobs.redis.delete(system.config["finetune"]["queue"]) == 1, "the message was in the queue"
    assert system.jobs.get(job.id).dispatched_attempt == 1, "it was sent"
    sweeper = system.worker("sweeper")
    events = watch(system.stub, job.id)
    assert system.stub.GetJob(pb.GetJobRequest(id=job.id)).state == pb.JOB_STATE_SUCCEEDED
    assert running_events(events), "it ran"
    assert "re-sent a job's message" in sweeper.logs()


def test_a_job_cancelled_while_its_model_loads_ends_cancelled_without_a_step(data_dir, tmp_path):
    """Loading is held by construction: the test holds the lock that building the built-in model takes,
    with the model's build stamp gone, so the worker's setup waits on it."""
    import fcntl

    models = tmp_path / "data" / "models" / "builtin"
    shutil.copytree(data_dir / "models" / "builtin" / "tiny-llm", models / "tiny-llm")
    stamp = models / "tiny-llm" / "modelworks-builtin.json"
    version = stamp.read_text()
    server = start_redis(tmp_path / "redis")
    config = {
        **TEST_SERVER_CONFIG,
        "data_dir": str(tmp_path / "data"),
        "redis_url": server.url,
        "finetune": FAST_LEASES | {"queue": f"q-{tmp_path.name}", "lease_ttl_s": 120},  # no lapse while held
    }
    api = spawn_service("finetune", tmp_path / "api", config)
    workers = []
    try:
        with grpc.insecure_channel(api.address) as channel, (models / ".tiny-llm.lock").open("a") as lock:
            stub = finetune_pb2_grpc.FineTuneServiceStub(channel)
            job = stub.CreateJob(job_request("llm", "lora", "cancelled-loading", max_steps=100_000))
            fcntl.flock(lock, fcntl.LOCK_EX)
            stamp.unlink()  # as while another process builds it
            workers.append(spawn_worker(tmp_path / "worker", config, "loader"))
            wait_for_event(stub, job.id, lambda e: e.type == "state" and e.state == pb.JOB_STATE_RUNNING)
            stub.CancelJob(pb.CancelJobRequest(id=job.id))
            stamp.write_text(version)
            fcntl.flock(lock, fcntl.LOCK_UN)
            events = watch(stub, job.id)
            final = stub.GetJob(pb.GetJobRequest(id=job.id))
        assert final.state == pb.JOB_STATE_CANCELLED and final.step == 0
        assert events[-1].message == "cancelled before training started"
        assert not [e for e in events if e.type == "progress"], "not one training step"
    finally:
        for worker in workers:
            worker.kill()
        api.stop()
        server.stop()
