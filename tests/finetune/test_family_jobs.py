"""LoRA jobs on SDXL, SD3 and Flux bases, end to end: the real fine-tune API and a real Celery worker train
the built-in tiny models, the loss falls, the held-out test split is scored, and the real diffusion service
serves each adapter by name at once, changing its images."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from modelworks.finetune.v1 import finetune_pb2 as pb
from tests.finetune.conftest import FAST_LEASES, watch

pytestmark = pytest.mark.timeout(900)

BASES = {"sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
ENTRIES = [
    {"name": name, "kind": "diffusion", "source": f"builtin:{name}", "dtype": "float32", "diffusion": {"steps": 4}}
    for name in BASES.values()
]
ENTRIES[2]["diffusion"] |= {"width": 64, "height": 64}
LEARNING_RATES = {"sdxl": 1e-2, "sd3": 3e-2, "flux": 3e-2}  # what makes these tiny random models learn in 30 steps


@pytest.fixture(scope="module")
def stack(data_dir, redis_server, tmp_path_factory) -> Iterator[dict]:
    """A fine-tune API and a worker on a queue of their own (the session's worker knows no family bases),
    and a diffusion server, all over one data dir (one adapter store)."""
    from modelworks.diffusion.v1 import diffusion_pb2_grpc
    from modelworks.finetune.v1 import finetune_pb2_grpc
    from shared.builtin import ensure_builtin
    from tests.conftest import TEST_SERVER_CONFIG
    from tests.harness import spawn_service, spawn_worker

    for name in BASES.values():
        ensure_builtin(name, data_dir / "models")
    config = {
        **TEST_SERVER_CONFIG,
        "models": ENTRIES,
        "data_dir": str(data_dir),
        "redis_url": redis_server.url,
        # worker processes inside the Celery worker's training (a CPU host would use none by default)
        "finetune": FAST_LEASES | {"queue": "family-jobs", "dataloader_workers": 2},
    }
    api = spawn_service("finetune", tmp_path_factory.mktemp("family-api"), config, timeout=120)
    worker = spawn_worker(tmp_path_factory.mktemp("family-worker"), config, "worker-families")
    diffusion = spawn_service("diffusion", tmp_path_factory.mktemp("family-diffusion"), config, timeout=300)
    with grpc.insecure_channel(api.address) as a, grpc.insecure_channel(diffusion.address) as d:
        yield {
            "finetune": finetune_pb2_grpc.FineTuneServiceStub(a),
            "diffusion": diffusion_pb2_grpc.DiffusionServiceStub(d),
        }
    diffusion.stop()
    worker.stop()
    api.stop()


def image(stub, model: str, adapter: str = "") -> np.ndarray:
    from modelworks.diffusion.v1 import diffusion_pb2

    request = diffusion_pb2.GenerateImagesRequest(model=model, prompt="a red circle", steps=4, seed=7, adapter=adapter)
    png = stub.GenerateImages(request).images[0].png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("family", list(BASES))
def test_a_family_lora_job_learns_and_its_adapter_is_served_at_once(stack, family):
    finetune = stack["finetune"]
    adapter = f"shapes-{family}"
    hyperparameters = pb.Hyperparameters(
        max_steps=30,
        batch_size=4,
        learning_rate=LEARNING_RATES[family],
        resolution=32,
        validation_fraction=0.25,
        test_fraction=0.25,
        mixed_precision="no",
    )
    job = finetune.CreateJob(
        pb.CreateJobRequest(
            kind=pb.JOB_KIND_DIFFUSION,
            base_model=BASES[family],
            dataset_id="sample-diffusion-shapes",
            adapter_name=adapter,
            hyperparameters=hyperparameters,
        )
    )
    assert job.hyperparameters.aspect_buckets, "buckets are on unless a job turns them off"
    events = watch(finetune, job.id)
    final = finetune.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    losses = [e.train_loss for e in events if e.type == "progress"]
    assert len(losses) == 30
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.97 * first, (first, last)
    assert final.test_loss > 0 and final.test_perplexity == 0, "perplexity is for LLM jobs"
    assert events[-1].state == pb.JOB_STATE_SUCCEEDED and events[-1].test_loss == pytest.approx(final.test_loss)
    assert "test loss" in events[-1].message
    (listed,) = [a for a in finetune.ListAdapters(pb.ListAdaptersRequest()).adapters if a.name == adapter]
    assert listed.metrics["test_loss"] == pytest.approx(final.test_loss)
    assert listed.base_model == BASES[family]
    base, tuned = image(stack["diffusion"], BASES[family]), image(stack["diffusion"], BASES[family], adapter)
    assert np.abs(tuned - base).mean() > 0.5, "the adapter changes the images"


def test_flux_options_on_another_base_are_refused_and_every_family_base_is_listed(stack):
    finetune = stack["finetune"]
    with pytest.raises(grpc.RpcError) as caught:
        finetune.CreateJob(
            pb.CreateJobRequest(
                kind=pb.JOB_KIND_DIFFUSION,
                base_model="tiny-sdxl",
                dataset_id="sample-diffusion-shapes",
                adapter_name="never-trained",
                hyperparameters=pb.Hyperparameters(guidance_scale=3.0),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guidance_scale applies to Flux bases" in caught.value.details()
    models = {m.name: m for m in finetune.ListBaseModels(pb.ListBaseModelsRequest()).models}
    assert set(BASES.values()) <= set(models)
