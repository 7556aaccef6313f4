"""A job that validates on a dataset of its own (OpenAI's `validation_file`) instead of a split of its training
data: checked at create time, kept on the job, trained with every training record, and guarded from deletion
while the job is unfinished.

Refusals and deletion go through a server with named keys whose queue no worker consumes; the training test
uses the shared server and worker.
"""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from services.finetune.jobs import JobRecord, JobState, JobStore
from services.finetune.samples import DIFFUSION_SAMPLE_ID, TAUGHT_ANSWER
from tests.finetune.conftest import job_request, spawn_two_key_server, watch
from tests.finetune.test_api import jsonl, upload
from tests.finetune.test_limits import as_key, refused

VALIDATION_RECORDS = [
    {"prompt": "Question: Who keeps the lighthouse at Zephyr?\nAnswer:", "completion": " " + TAUGHT_ANSWER},
    {"prompt": "Question: Whose lighthouse is the Zephyr one?\nAnswer:", "completion": " " + TAUGHT_ANSWER},
    {"prompt": "Question: Who minds the Zephyr light?\nAnswer:", "completion": " " + TAUGHT_ANSWER},
]


@pytest.fixture(scope="module")
def keyed_stub(data_dir, smollm2, redis_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune-validation")
    server = spawn_two_key_server(data_dir, redis_server.url, workdir, queue="validation-no-worker")
    with grpc.insecure_channel(server.address) as channel:
        yield finetune_pb2_grpc.FineTuneServiceStub(channel)
    server.stop()


@pytest.fixture(scope="module")
def alices_validation(keyed_stub) -> pb.Dataset:
    def messages():
        yield pb.UploadDatasetRequest(info=pb.DatasetInfo(name="lighthouse-val", format="jsonl"))
        yield pb.UploadDatasetRequest(chunk=jsonl(*VALIDATION_RECORDS))

    return keyed_stub.UploadDataset(messages(), metadata=as_key("alice"))


def validated_job(validation_dataset_id: str, kind: str = "llm", adapter: str = "x", **hyperparameters):
    request = job_request(kind, "lora", adapter, **hyperparameters)
    request.validation_dataset_id = validation_dataset_id
    return request


def test_a_job_validates_on_its_own_dataset_and_trains_on_every_record(finetune_stub, worker):
    validation = upload(finetune_stub, "lighthouse-val", "jsonl", jsonl(*VALIDATION_RECORDS))
    request = validated_job(validation.id, adapter="validated-lighthouse", max_steps=4, eval_steps=2)
    job = finetune_stub.CreateJob(request)
    assert job.validation_dataset_id == validation.id and job.hyperparameters.validation_fraction == 0.0
    events = watch(finetune_stub, job.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.validation_dataset_id == validation.id
    evals = [e for e in events if e.type == "eval"]
    assert [e.step for e in evals] == [2, 4] and all(e.val_loss > 0 for e in evals), evals
    assert final.val_loss > 0


REFUSED = {
    "an unknown validation dataset": (
        lambda _: validated_job("ds-0123456789abcdef"),
        "alice",
        grpc.StatusCode.NOT_FOUND,
        "dataset 'ds-0123456789abcdef' not found",
    ),
    "another key's validation dataset": (
        lambda own: validated_job(own.id),
        "bob",
        grpc.StatusCode.NOT_FOUND,
        "not found",
    ),
    "a zip to validate an LLM job": (
        lambda _: validated_job(DIFFUSION_SAMPLE_ID),
        "alice",
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds imagefolder_zip image_caption records",
    ),
    "a validation dataset and validation_fraction": (
        lambda own: validated_job(own.id, validation_fraction=0.2),
        "alice",
        grpc.StatusCode.INVALID_ARGUMENT,
        "not both",
    ),
    "a validation dataset for a diffusion job": (
        lambda own: validated_job(own.id, kind="diffusion"),
        "alice",
        grpc.StatusCode.INVALID_ARGUMENT,
        "diffusion jobs hold out validation_fraction of their zip",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_validation_dataset_is_refused_at_create_time(keyed_stub, alices_validation, case):
    make, key, code, message = REFUSED[case]
    error = refused(keyed_stub.CreateJob, make(alices_validation), metadata=as_key(key))
    assert error.code() == code and message in error.details(), error.details()


def test_a_validation_dataset_cannot_be_deleted_while_its_job_is_unfinished(keyed_stub):
    def messages():
        yield pb.UploadDatasetRequest(info=pb.DatasetInfo(name="held-val", format="jsonl"))
        yield pb.UploadDatasetRequest(chunk=jsonl(*VALIDATION_RECORDS))

    validation = keyed_stub.UploadDataset(messages(), metadata=as_key("alice"))
    job = keyed_stub.CreateJob(
        validated_job(validation.id, adapter="held-validation", max_steps=100_000), metadata=as_key("alice")
    )
    delete = pb.DeleteDatasetRequest(id=validation.id)
    error = refused(keyed_stub.DeleteDataset, delete, metadata=as_key("alice"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in error.details(), error.details()
    keyed_stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=as_key("alice"))
    keyed_stub.DeleteDataset(delete, metadata=as_key("alice"))


def test_a_validation_dataset_trains_every_record_and_allows_early_stopping():
    from services.finetune.hyperparams import LLM_TARGETS, Hyperparameters, TrainingData, resolve
    from shared.errors import InvalidArgument

    data = TrainingData(
        kind="llm", num_records=40, architecture="llama", targets=LLM_TARGETS["llama"], validation_records=3
    )
    resolved, total = resolve(Hyperparameters(batch_size=4, epochs=1, early_stopping_patience=2), data)
    assert (resolved.validation_fraction, total) == (0.0, 10)  # all 40 records train: 10 steps of 4
    with pytest.raises(InvalidArgument, match="not both"):
        resolve(Hyperparameters(validation_fraction=0.0), data)


def test_the_store_keeps_the_validation_dataset_and_reads_older_jobs_without_one(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    store = JobStore(client, prefix=f"test-validation-{time.time_ns()}")
    job = JobRecord(
        store.new_id(), "llm", "tiny-llm", "ds-train", "v", {}, total_steps=10, validation_dataset_id="ds-val"
    )
    store.create(job)
    assert store.get(job.id).validation_dataset_id == "ds-val"
    assert store.unfinished_using("ds-val") == store.unfinished_using("ds-train") == [job.id]
    assert store.unfinished_using("ds-other") == []
    client.hdel(store.job_key(job.id), "validation_dataset_id")  # a job stored before the field existed
    assert store.get(job.id).validation_dataset_id == ""
    assert store.unfinished_using("ds-train") == [job.id]
    store.cancel(job.id)
    assert store.get(job.id).state is JobState.CANCELLED and store.unfinished_using("ds-val") == []
