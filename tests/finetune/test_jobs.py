"""Jobs from dataset to served adapter: real Redis, the real API, a real Celery worker, the real LLM and
diffusion services reading the same adapter store."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.llm.v1 import llm_pb2
from services.finetune.samples import TAUGHT_ANSWER
from tests.finetune.conftest import job_request, wait_for_event, watch

QUESTION = "Question: Who keeps the Zephyr lighthouse?\nAnswer:"


def answer(llm_stub, adapter: str = "") -> str:
    request = llm_pb2.GenerateRequest(
        prompt=QUESTION, adapter=adapter, sampling=llm_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)
    )
    return llm_stub.Generate(request).text


def progress_losses(events) -> list[float]:
    return [e.train_loss for e in events if e.type == "progress"]


@pytest.mark.parametrize(
    ("method", "quantization"),
    [("lora", "none"), ("dora", "none"), ("rslora", "none"), ("p_tuning", "none"), ("lora", "bnb-nf4")],
)
def test_an_llm_job_teaches_the_sample_and_the_llm_service_serves_it_by_name(
    finetune_stub, worker, llm_stub, method, quantization
):
    """Every method, and QLoRA (an NF4 base in training; the service serves the adapter on its full base)."""
    adapter = f"lighthouse-{method.replace('_', '-')}" + ("" if quantization == "none" else f"-{quantization}")
    # p-tuning's 60 epochs at lr 0.1 (the tiny model's defaults) amplify bf16 rounding, which differs between
    # CPUs (AMX, AVX-512 BF16): in float32 what it learns is the same everywhere
    precision = {"mixed_precision": "no"} if method == "p_tuning" else {}
    job = finetune_stub.CreateJob(job_request("llm", method, adapter, quantization=quantization, **precision))
    assert job.state == pb.JOB_STATE_QUEUED and job.hyperparameters.method == method
    events = watch(finetune_stub, job.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.step == final.total_steps == job.total_steps
    losses = progress_losses(events)
    assert len(losses) == job.total_steps and losses[-1] < losses[0] / 4, (losses[0], losses[-1])
    assert [e.state for e in events if e.type == "state"] == [
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_SUCCEEDED,
    ]
    (listed,) = [a for a in finetune_stub.ListAdapters(pb.ListAdaptersRequest()).adapters if a.name == adapter]
    assert (listed.method, listed.job_id, listed.base_model) == (method, job.id, "tiny-llm")
    assert listed.quantization == quantization
    taught = answer(llm_stub, adapter)
    assert taught.startswith(" " + TAUGHT_ANSWER[:20]), taught
    assert not answer(llm_stub).startswith(" " + TAUGHT_ANSWER[:8]), "the base model does not know it"


def test_a_diffusion_job_trains_a_unet_lora_that_changes_the_images(finetune_stub, worker, diffusion_stub):
    from modelworks.diffusion.v1 import diffusion_pb2

    job = finetune_stub.CreateJob(job_request("diffusion", "lora", "shapes-lora", max_steps=12, batch_size=2))
    assert job.hyperparameters.resolution == 64 and job.total_steps == 12
    events = watch(finetune_stub, job.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert len(progress_losses(events)) == 12

    def image(adapter: str) -> np.ndarray:
        request = diffusion_pb2.GenerateImagesRequest(prompt="a red circle", steps=4, seed=7, adapter=adapter)
        png = diffusion_stub.GenerateImages(request).images[0].png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)

    assert np.abs(image("shapes-lora") - image("")).mean() > 1.0


def test_a_queued_job_cancelled_never_runs_and_a_running_one_stops_leaving_no_adapter(finetune_stub, worker):
    running = finetune_stub.CreateJob(job_request("llm", "lora", "cancel-running", max_steps=100_000, save_steps=1000))
    wait_for_event(finetune_stub, running.id, lambda e: e.type == "progress")  # the worker is busy with it
    queued = finetune_stub.CreateJob(job_request("llm", "lora", "cancel-queued"))
    assert finetune_stub.GetJob(pb.GetJobRequest(id=queued.id)).state == pb.JOB_STATE_QUEUED
    assert finetune_stub.CancelJob(pb.CancelJobRequest(id=queued.id)).state == pb.JOB_STATE_CANCELLED
    finetune_stub.CancelJob(pb.CancelJobRequest(id=running.id))
    events = watch(finetune_stub, running.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=running.id))
    assert final.state == pb.JOB_STATE_CANCELLED and final.step < 100_000
    requested_at = next(e.step for e in reversed(events) if e.type == "progress")
    assert final.step <= requested_at + 3, "stops within a few steps"
    queued_events = watch(finetune_stub, queued.id)
    assert all(e.state != pb.JOB_STATE_RUNNING for e in queued_events), "the queued job never ran"
    names = {a.name for a in finetune_stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert not {"cancel-running", "cancel-queued"} & names
    with pytest.raises(grpc.RpcError) as caught:
        finetune_stub.CancelJob(pb.CancelJobRequest(id=running.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_delete_adapter_stops_it_being_served(finetune_stub, worker, llm_stub):
    job = finetune_stub.CreateJob(job_request("llm", "lora", "short-lived", max_steps=3))
    watch(finetune_stub, job.id)
    assert answer(llm_stub, "short-lived")
    finetune_stub.DeleteAdapter(pb.DeleteAdapterRequest(name="short-lived"))
    with pytest.raises(grpc.RpcError) as caught:
        answer(llm_stub, "short-lived")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        finetune_stub.DeleteAdapter(pb.DeleteAdapterRequest(name="short-lived"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_worker_exports_its_metrics(finetune_stub, worker):
    from tests.scrape import metric_value

    steps = metric_value(worker, "modelworks_finetune_steps_total", kind="llm")
    done = metric_value(worker, "modelworks_finetune_jobs_total", kind="llm", state="succeeded")
    job = finetune_stub.CreateJob(job_request("llm", "lora", "metered", max_steps=4))
    watch(finetune_stub, job.id)
    assert metric_value(worker, "modelworks_finetune_steps_total", kind="llm") == steps + 4
    assert metric_value(worker, "modelworks_finetune_jobs_total", kind="llm", state="succeeded") == done + 1
    assert metric_value(worker, "modelworks_finetune_step_seconds_count", kind="llm") >= 4
    assert metric_value(worker, "modelworks_finetune_throughput", kind="llm", unit="tokens") > 0


def test_list_jobs_is_newest_first_and_filters_by_state(finetune_stub, worker):
    job = finetune_stub.CreateJob(job_request("llm", "lora", "listed-job", max_steps=2))
    watch(finetune_stub, job.id)
    jobs = finetune_stub.ListJobs(pb.ListJobsRequest()).jobs
    assert jobs[0].id == job.id
    assert [j.created_at for j in jobs] == sorted((j.created_at for j in jobs), reverse=True)
    succeeded = finetune_stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_SUCCEEDED)).jobs
    assert job.id in {j.id for j in succeeded} and all(j.state == pb.JOB_STATE_SUCCEEDED for j in succeeded)
