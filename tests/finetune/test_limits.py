"""The fine-tune API's bounds and ownership, through a real server with named keys: who sees and may change
what, per-key job quotas, the watcher cap, the training budget, and Redis faults answered UNAVAILABLE.

Jobs here go to a queue no worker consumes, so each stays QUEUED (held by construction) until cancelled.
"""

from __future__ import annotations

import functools
import itertools
import time

import grpc
import pytest

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from tests.finetune.conftest import finetune_config, job_request
from tests.finetune.test_api import jsonl
from tests.harness import spawn_service, start_redis, wait_for

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab", "root": "root-key-0123456789a"}
BOB_QUOTA = 2
TRAIN_PIXELS = 100_000  # the 16 sample images at 64 px (65,536 pixels) fit; at 128 px they do not


def as_key(name: str) -> tuple:
    return (("authorization", f"Bearer {KEYS[name]}"),)


@pytest.fixture(scope="module")
def keyed_server(data_dir, smollm2, redis_server, tmp_path_factory):
    config = finetune_config(
        data_dir, redis_server.url, queue="limits-no-worker", max_watchers=1, max_train_pixels=TRAIN_PIXELS
    )
    config["api_keys"] = [
        {"name": "alice", "key": KEYS["alice"], "scopes": ["finetune"]},
        {"name": "bob", "key": KEYS["bob"], "scopes": ["finetune"], "max_queued_jobs": BOB_QUOTA},
        {"name": "root", "key": KEYS["root"], "scopes": ["admin"]},
    ]
    server = spawn_service("finetune", tmp_path_factory.mktemp("finetune-keys"), config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(keyed_server):
    with grpc.insecure_channel(keyed_server.address) as channel:
        yield finetune_pb2_grpc.FineTuneServiceStub(channel)


def refused(call, request, **kwargs) -> grpc.RpcError:
    """The error `call` answers (for a stream, at its first message)."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, **kwargs)
        if isinstance(result, grpc.Call):  # a stream: its first message brings the answer
            next(result)
    return caught.value


def create(stub, key: str, adapter: str, **request_fields) -> pb.Job:
    request = job_request("llm", "lora", adapter, max_steps=100_000, **request_fields)
    return stub.CreateJob(request, metadata=as_key(key))


def test_another_keys_job_and_dataset_are_not_found_and_unlisted(stub):
    dataset = upload_as(stub, "alice", "alice-notes")
    assert dataset.owner == "alice"
    job = stub.CreateJob(
        pb.CreateJobRequest(
            kind=pb.JOB_KIND_LLM, base_model="tiny-llm", dataset_id=dataset.id, adapter_name="alice-private"
        ),
        metadata=as_key("alice"),
    )
    try:
        assert job.owner == "alice"
        for call, request in (
            (stub.GetJob, pb.GetJobRequest(id=job.id)),
            (stub.CancelJob, pb.CancelJobRequest(id=job.id)),
            (stub.WatchJob, pb.WatchJobRequest(id=job.id)),
            (stub.DeleteDataset, pb.DeleteDatasetRequest(id=dataset.id)),
        ):
            error = refused(call, request, metadata=as_key("bob"))
            assert error.code() == grpc.StatusCode.NOT_FOUND, (call, error.details())
        error = refused(
            stub.CreateJob,
            pb.CreateJobRequest(kind=pb.JOB_KIND_LLM, base_model="tiny-llm", dataset_id=dataset.id, adapter_name="b"),
            metadata=as_key("bob"),
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND and dataset.id in error.details()
        assert job.id not in job_ids(stub, "bob")
        assert job.id in job_ids(stub, "alice") and job.id in job_ids(stub, "root")
        bobs_datasets = {d.id for d in stub.ListDatasets(pb.ListDatasetsRequest(), metadata=as_key("bob")).datasets}
        assert dataset.id not in bobs_datasets and "sample-llm-lighthouse" in bobs_datasets  # samples: everyone's
        error = refused(stub.DeleteDataset, pb.DeleteDatasetRequest(id=dataset.id), metadata=as_key("alice"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in error.details()
        error = refused(stub.CreateJob, job_request("llm", "lora", "alice-private"), metadata=as_key("bob"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "another key's job" in error.details()
        assert job.id not in error.details(), "another key's job id is not revealed"
        error = refused(stub.CreateJob, job_request("llm", "lora", "alice-private"), metadata=as_key("alice"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and job.id in error.details(), "its owner is told"
    finally:
        stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=as_key("alice"))
    stub.DeleteDataset(pb.DeleteDatasetRequest(id=dataset.id), metadata=as_key("alice"))
    error = refused(stub.DeleteDataset, pb.DeleteDatasetRequest(id=dataset.id), metadata=as_key("root"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_only_an_admin_may_delete_what_no_key_owns(stub):
    error = refused(stub.DeleteDataset, pb.DeleteDatasetRequest(id="sample-llm-lighthouse"), metadata=as_key("bob"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in error.details()


def test_an_adapter_is_listed_to_and_deletable_by_its_owner_and_admins_only(stub, settings):
    from shared.adapters import AdapterInfo, AdapterStore

    store = AdapterStore(settings.adapters_dir)
    store.save(AdapterInfo(name="alices-adapter", kind="llm", base_model="tiny-llm", owner="alice"), lambda _: None)
    listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=as_key("alice")).adapters}
    assert listed["alices-adapter"].owner == "alice"
    assert "alices-adapter" not in {
        a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=as_key("bob")).adapters
    }
    error = refused(stub.DeleteAdapter, pb.DeleteAdapterRequest(name="alices-adapter"), metadata=as_key("bob"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    stub.DeleteAdapter(pb.DeleteAdapterRequest(name="alices-adapter"), metadata=as_key("alice"))
    assert not store.path("alices-adapter").exists()


def test_a_key_has_at_most_its_quota_of_unfinished_jobs(stub):
    jobs = [create(stub, "bob", f"bob-quota-{i}") for i in range(BOB_QUOTA)]
    try:
        error = refused(stub.CreateJob, job_request("llm", "lora", "bob-quota-over"), metadata=as_key("bob"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"already has {BOB_QUOTA} jobs queued or running; the limit is {BOB_QUOTA}" in error.details()
        assert "max_queued_jobs of the API key 'bob'" in error.details()
        jobs.append(create(stub, "alice", "alice-not-counted"))  # another key's jobs do not count
        stub.CancelJob(pb.CancelJobRequest(id=jobs[0].id), metadata=as_key("bob"))
        jobs.append(create(stub, "bob", "bob-quota-again"))  # an ended job frees its place
    finally:
        cancel_unfinished(stub, jobs)


def test_a_diffusion_job_past_the_training_budget_is_refused(stub):
    request = job_request("diffusion", "lora", "too-many-pixels", max_steps=100_000, resolution=128)
    error = refused(stub.CreateJob, request, metadata=as_key("alice"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "finetune.max_train_pixels" in error.details()
    fits = stub.CreateJob(job_request("diffusion", "lora", "few-pixels", max_steps=100_000), metadata=as_key("alice"))
    stub.CancelJob(pb.CancelJobRequest(id=fits.id), metadata=as_key("alice"))


def test_watchers_past_the_cap_are_refused_and_a_closed_one_frees_its_place(stub):
    job = create(stub, "alice", "watched")
    try:
        first = stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=as_key("alice"), timeout=120)
        assert next(first).state == pb.JOB_STATE_QUEUED  # the stream is open and holds the only place
        error = refused(stub.WatchJob, pb.WatchJobRequest(id=job.id), metadata=as_key("alice"), timeout=60)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "finetune.max_watchers" in error.details()
        first.cancel()
        second = wait_for(lambda: open_watch(stub, job.id), 60, "the closed watcher's place to be freed")
    finally:
        stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=as_key("alice"))
    assert [e.state for e in second][-1] == pb.JOB_STATE_CANCELLED


def test_redis_faults_answer_unavailable_promptly(data_dir, smollm2, tmp_path_factory):
    redis_process = start_redis(tmp_path_factory.mktemp("redis-to-stop"))
    config = finetune_config(data_dir, redis_process.url, queue="limits-no-worker")
    server = spawn_service("finetune", tmp_path_factory.mktemp("finetune-redis-down"), config)
    try:
        redis_process.stop()
        with grpc.insecure_channel(server.address) as channel:
            stub = finetune_pb2_grpc.FineTuneServiceStub(channel)
            for call, request in (
                (stub.ListJobs, pb.ListJobsRequest()),
                (stub.GetJob, pb.GetJobRequest(id="ftjob-0123456789abcdef")),
                (stub.WatchJob, pb.WatchJobRequest(id="ftjob-0123456789abcdef")),
                (stub.CreateJob, job_request("llm", "lora", "never-stored")),
            ):
                started = time.monotonic()
                error = refused(call, request, timeout=60)
                assert error.code() == grpc.StatusCode.UNAVAILABLE, (call, error.code(), error.details())
                assert "the job store (Redis) is unreachable" in error.details()
                assert time.monotonic() - started < 30
    finally:
        server.stop()
        redis_process.stop()


def test_a_redis_password_never_reaches_a_log_line():
    from services.finetune.app import redacted

    assert redacted("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://user:s3cret@redis:6380/1") == "rediss://user:***@redis:6380/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- helpers ------------------------------------------------------------------------------------------------


def upload_as(stub, key: str, name: str) -> pb.Dataset:
    data = jsonl(*[{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)])
    messages = iter(
        [pb.UploadDatasetRequest(info=pb.DatasetInfo(name=name, format="jsonl")), pb.UploadDatasetRequest(chunk=data)]
    )
    return stub.UploadDataset(messages, metadata=as_key(key))


def job_ids(stub, key: str) -> set[str]:
    return {j.id for j in stub.ListJobs(pb.ListJobsRequest(limit=1000), metadata=as_key(key)).jobs}


def cancel_unfinished(stub, jobs: list[pb.Job]) -> None:
    for job in jobs:
        state = stub.GetJob(pb.GetJobRequest(id=job.id), metadata=as_key("root")).state
        if state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
            stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=as_key("root"))


def open_watch(stub, job_id: str):
    """A watch stream that got its first event, or None while the cap still refuses it."""
    stream = stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=as_key("alice"), timeout=120)
    try:
        first = next(stream)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return None
    return itertools.chain([first], stream)


def test_retention_removes_ended_jobs_with_their_folders(redis_server, tmp_path):
    import redis

    from services.finetune.api import DAY_S, FineTuneAPI
    from services.finetune.datasets import DatasetStore
    from services.finetune.jobs import JobRecord, JobStore
    from services.finetune.queue import make_celery
    from shared.settings import Settings

    settings = Settings(data_dir=tmp_path, redis_url=redis_server.url, finetune={"job_retention_days": 2})
    jobs = JobStore(redis.Redis.from_url(redis_server.url), prefix=f"retention-{time.time_ns()}")
    api = FineTuneAPI(settings, jobs, DatasetStore(settings.datasets_dir, settings.finetune), make_celery(settings))
    ended, queued = (
        jobs.create(JobRecord(jobs.new_id(), "llm", "tiny-llm", "ds", name, {}, total_steps=1))
        for name in ("ended", "queued")
    )
    jobs.cancel(ended.id)
    for job in (ended, queued):
        (settings.jobs_dir / job.id / "checkpoints").mkdir(parents=True)
    assert api.expire_finished_jobs(now=time.time() + 1 * DAY_S) == []  # within the 2 days
    assert api.expire_finished_jobs(now=time.time() + 3 * DAY_S) == [ended.id]
    assert not (settings.jobs_dir / ended.id).exists()
    assert (settings.jobs_dir / queued.id).exists() and [j.id for j in jobs.list()] == [queued.id]


def test_fuzzed_ownership_calls_never_answer_internal(stub):
    """tests/test_fuzz.py covers the inference services; these are the RPCs that check ownership."""
    from tests.fuzzing import FuzzTarget, fuzz

    likely = {"id": ["", "ds-0123456789abcdef", "ftjob-0123456789abcdef", "sample-llm-lighthouse", "../x"]}
    for name, request_class in (
        ("DeleteDataset", pb.DeleteDatasetRequest),
        ("GetJob", pb.GetJobRequest),
        ("CancelJob", pb.CancelJobRequest),
    ):
        call = functools.partial(getattr(stub, name), metadata=as_key("root"))  # PERMISSION_DENIED is not in ACCEPTABLE
        report = fuzz(FuzzTarget(name, request_class, call, False, likely), 30, derandomize=True)
        assert report.examples >= 10, report
