"""The gateway for real: a `python -m services.gateway` process in front of real LLM, diffusion and fine-tune
services (with a `redis-server` and a Celery worker), reached over HTTP by `gradio_client` and Chromium."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import TEST_SERVER_CONFIG
from tests.finetune.conftest import FAST_LEASES
from tests.harness import ServiceProcess, free_port, spawn_gateway, spawn_service, spawn_worker, start_redis


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture can tell a failed test (and screenshot it)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def running_requests(llm_server) -> float:
    """tiny-llm's sequences in the LLM server's running batch (its gauge)."""
    from tests.scrape import metric_value

    return metric_value(llm_server, "modelworks_llm_num_requests_running", model="tiny-llm")


def gateway_env(llm: str, diffusion: str, finetune: str, **extra: str) -> dict[str, str]:
    return {
        "MODELWORKS_LLM_TARGET": llm,
        "MODELWORKS_DIFFUSION_TARGET": diffusion,
        "MODELWORKS_FINETUNE_TARGET": finetune,
        **extra,
    }


@pytest.fixture(scope="session")
def gateway_finetune(data_dir, adapters, diffusion_adapters, tmp_path_factory) -> Iterator[ServiceProcess]:
    """A fine-tune API and one worker on their own Redis, training into the shared data dir (so the LLM and
    diffusion servers serve what they train)."""
    redis = start_redis(tmp_path_factory.mktemp("gateway-redis"))
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "redis_url": redis.url, "finetune": FAST_LEASES}
    api = spawn_service("finetune", tmp_path_factory.mktemp("gateway-finetune"), config, timeout=120)
    worker = spawn_worker(tmp_path_factory.mktemp("gateway-worker"), config, "gateway-worker")
    yield api
    worker.stop()
    api.stop()
    redis.stop()


@pytest.fixture(scope="session")
def gateway(llm_server, diffusion_server, gateway_finetune, tmp_path_factory) -> Iterator[ServiceProcess]:
    env = gateway_env(
        llm_server.address,
        diffusion_server.address,
        gateway_finetune.address,
        MODELWORKS_LLM_METRICS_URL=f"http://127.0.0.1:{llm_server.metrics_port}/metrics",
        MODELWORKS_DIFFUSION_METRICS_URL=f"http://127.0.0.1:{diffusion_server.metrics_port}/metrics",
        MODELWORKS_FINETUNE_METRICS_URL=f"http://127.0.0.1:{gateway_finetune.metrics_port}/metrics",
    )
    process = spawn_gateway(tmp_path_factory.mktemp("gateway"), env)
    yield process
    process.stop()


@pytest.fixture
def client(gateway):
    """A fresh `gradio_client` session (chat history lives per session)."""
    from gradio_client import Client

    return Client(gateway.address, verbose=False)


@pytest.fixture(scope="session")
def unreachable_target() -> str:
    """An address where nothing listens: a stopped service."""
    return f"127.0.0.1:{free_port()}"
