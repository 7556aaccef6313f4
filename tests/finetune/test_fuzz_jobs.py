"""Fuzzing CreateJob (every hyperparameter, the data path's and the diffusion families' included) through a
real channel to a real fine-tune API (see tests/fuzzing.py): never INTERNAL or UNKNOWN, never a hang.

The API has a Redis of its own and queues on a queue no worker reads, so what it accepts stays queued."""

from __future__ import annotations

import itertools
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelworks.finetune.v1 import finetune_pb2 as pb
from tests.finetune.conftest import FAST_LEASES
from tests.finetune.test_family_jobs import ENTRIES
from tests.fuzzing import FuzzTarget, fuzz

pytestmark = pytest.mark.timeout(900)

EXAMPLES = int(os.environ.get("MODELWORKS_FUZZ_EXAMPLES", "30")) * 2
LIKELY = {
    "base_model": ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-llm"],
    "dataset_id": ["sample-diffusion-shapes", "sample-llm-lighthouse"],
    "adapter_name": ["fuzz-a", "fuzz-b"],
    "method": ["", "lora", "dora", "rslora", "p_tuning"],
    "class_prompt": ["", "a dog"],
    "mixed_precision": ["", "auto", "no", "bf16"],
    "optimizer": ["", "adamw"],
}


@pytest.fixture(scope="module")
def fuzzed_api(data_dir, tmp_path_factory):
    from shared.builtin import ensure_builtin
    from tests.conftest import TEST_SERVER_CONFIG
    from tests.harness import spawn_service, start_redis

    for entry in ENTRIES:
        ensure_builtin(entry["source"].removeprefix("builtin:"), data_dir / "models")
    redis = start_redis(tmp_path_factory.mktemp("fuzz-redis"))
    config = {
        **TEST_SERVER_CONFIG,
        "models": [*TEST_SERVER_CONFIG["models"], *ENTRIES],
        "data_dir": str(data_dir),
        "redis_url": redis.url,
        "finetune": FAST_LEASES | {"queue": "nobody-reads-this"},
    }
    server = spawn_service("finetune", tmp_path_factory.mktemp("fuzz-api"), config, timeout=120)
    yield server
    server.stop()
    redis.stop()


def test_no_job_request_gets_internal_or_hangs(fuzzed_api):
    """Whole requests, then every hyperparameter under a valid job for each kind of base (the refusals of
    the job's envelope would otherwise hide the hyperparameters' checks)."""
    from modelworks.finetune.v1 import finetune_pb2_grpc

    names = itertools.count()
    with grpc.insecure_channel(fuzzed_api.address) as channel:
        stub = finetune_pb2_grpc.FineTuneServiceStub(channel)

        def under(kind: int, base: str, dataset: str):
            def create(hyperparameters: pb.Hyperparameters, timeout: float):
                request = pb.CreateJobRequest(
                    kind=kind,
                    base_model=base,
                    dataset_id=dataset,
                    adapter_name=f"fuzz-{next(names)}",
                    hyperparameters=hyperparameters,
                )
                return stub.CreateJob(request, timeout=timeout)

            return FuzzTarget(f"CreateJob hyperparameters on {base}", pb.Hyperparameters, create, False, LIKELY)

        targets = [
            FuzzTarget("FineTune CreateJob", pb.CreateJobRequest, stub.CreateJob, False, LIKELY),
            under(pb.JOB_KIND_DIFFUSION, "tiny-flux", "sample-diffusion-shapes"),
            under(pb.JOB_KIND_DIFFUSION, "tiny-sdxl", "sample-diffusion-shapes"),
            under(pb.JOB_KIND_LLM, "tiny-llm", "sample-llm-lighthouse"),
        ]
        for target in targets:
            report = fuzz(target, EXAMPLES, derandomize=True)
            assert report.examples >= min(EXAMPLES, 10), (target.name, report)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert fuzzed_api.process.poll() is None
