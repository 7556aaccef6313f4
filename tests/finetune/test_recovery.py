"""Jobs survive what kills processes: a worker killed mid-job, duplicate messages, a Redis restart.

Each test has its own Redis, API and queue, so killing things here disturbs no other test.
"""

from __future__ import annotations

import grpc
import pytest

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from tests.finetune.conftest import finetune_config, job_request, wait_for_event, watch
from tests.harness import spawn_service, spawn_worker, start_redis


@pytest.fixture
def system(data_dir, tmp_path):
    """A private Redis and fine-tune API; `system.worker(name)` starts workers on its queue."""

    class System:
        def __init__(self):
            self.redis = start_redis(tmp_path / "redis")
            self.config = finetune_config(data_dir, self.redis.url, queue=f"q-{tmp_path.name}")
            self.api = spawn_service("finetune", tmp_path / "api", self.config)
            self.channel = grpc.insecure_channel(self.api.address)
            self.stub = finetune_pb2_grpc.FineTuneServiceStub(self.channel)
            self.workers = []

        def worker(self, name: str):
            process = spawn_worker(tmp_path / "workers", self.config, name)
            self.workers.append(process)
            return process

        def close(self):
            for process in self.workers:
                process.kill()
            self.channel.close()
            self.api.stop()
            self.redis.stop()

    built = System()
    yield built
    built.close()


def running_events(events) -> list:
    return [e for e in events if e.type == "state" and e.state == pb.JOB_STATE_RUNNING]


def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes_from_its_checkpoint(system):
    first = system.worker("first")
    job = system.stub.CreateJob(job_request("llm", "lora", "survivor", max_steps=300, save_steps=10))
    checkpoint = wait_for_event(system.stub, job.id, lambda e: e.type == "checkpoint" and e.step >= 20)
    first.kill()  # SIGKILL: no chance to hand the job back
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
    wait_for_event(system.stub, job.id, lambda e: e.type == "progress" and e.step >= 10)
    system.redis.restart()  # AOF with fsync always: every acknowledged write is on disk
    events = watch(system.stub, job.id)
    final = system.stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    steps = [e.step for e in events if e.type == "progress"]
    assert set(steps) == set(range(1, 151)), "no step's event was lost"
    assert "through-restart" in {a.name for a in system.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
