"""The fine-tune service for real: a `redis-server` with AOF, the API process, and Celery worker processes.

Leases are short here (8 s, renewed every second, swept every second) so that recovery from a killed
worker takes seconds, not the minute the defaults allow; and every step's progress is written at once
(progress_interval_s 0), so tests can check each step's event. `test_recovery` checks the default, batched
writing too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from tests.conftest import SMOLLM2, TEST_SERVER_CONFIG
from tests.harness import RedisProcess, WorkerProcess, spawn_service, spawn_worker, start_redis

FAST_LEASES = {"lease_ttl_s": 8, "lease_renew_s": 1, "sweep_interval_s": 1, "progress_interval_s": 0}


def finetune_config(data_dir, redis_url: str, **finetune) -> dict:
    """The test models plus the real SmolLM2 (converted by the `smollm2` fixture, which the servers need)."""
    return {
        **TEST_SERVER_CONFIG,
        "models": [*TEST_SERVER_CONFIG["models"], SMOLLM2],
        "data_dir": str(data_dir),
        "redis_url": redis_url,
        "finetune": FAST_LEASES | finetune,
    }


def spawn_two_key_server(data_dir, redis_url: str, workdir, queue: str):
    """A fine-tune API with the keys `alice` and `bob` (finetune scope) on a queue no worker reads: what it
    queues stays queued, by construction."""
    from tests.finetune.test_limits import KEYS

    config = finetune_config(data_dir, redis_url, queue=queue)
    config["api_keys"] = [{"name": name, "key": KEYS[name], "scopes": ["finetune"]} for name in ("alice", "bob")]
    return spawn_service("finetune", workdir, config)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def finetune_server(data_dir, smollm2, redis_server, tmp_path_factory):
    config = finetune_config(data_dir, redis_server.url)
    server = spawn_service("finetune", tmp_path_factory.mktemp("finetune-api"), config, timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def finetune_stub(finetune_server):
    from modelworks.finetune.v1 import finetune_pb2_grpc

    with grpc.insecure_channel(finetune_server.address) as channel:
        yield finetune_pb2_grpc.FineTuneServiceStub(channel)


@pytest.fixture(scope="session")
def worker(data_dir, smollm2, redis_server, tmp_path_factory) -> Iterator[WorkerProcess]:
    process = spawn_worker(tmp_path_factory.mktemp("worker"), finetune_config(data_dir, redis_server.url), "worker-a")
    yield process
    process.stop()


def job_request(kind: str = "llm", method: str = "", adapter: str = "", **hyperparameters):
    from modelworks.finetune.v1 import finetune_pb2 as pb

    llm = kind == "llm"
    return pb.CreateJobRequest(
        kind=pb.JOB_KIND_LLM if llm else pb.JOB_KIND_DIFFUSION,
        base_model="tiny-llm" if llm else "tiny-sd",
        dataset_id="sample-llm-lighthouse" if llm else "sample-diffusion-shapes",
        adapter_name=adapter,
        hyperparameters=pb.Hyperparameters(method=method, **hyperparameters),
    )


def watch(stub, job_id: str, timeout: float = 600) -> list:
    """Every event of the job until it ends (WatchJob replays from the start)."""
    from modelworks.finetune.v1 import finetune_pb2 as pb

    return list(stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout))


def wait_for_event(stub, job_id: str, predicate, timeout: float = 300):
    """Follow the job's events until one satisfies `predicate`; returns it."""
    from modelworks.finetune.v1 import finetune_pb2 as pb

    deadline = time.monotonic() + timeout
    for event in stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout):
        if predicate(event):
            return event
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"job {job_id} ended or timed out before the awaited event")
