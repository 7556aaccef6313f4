"""The OpenAI API for real: a `python -m services.openai` process in front of real services, driven by the
official `openai` SDK (sync and async clients) over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import TEST_SERVER_CONFIG
from tests.harness import ServiceProcess, free_port, spawn_openai

UPLOAD_LIMIT = 2 * 1024 * 1024  # the test server's openai.max_upload_bytes (a larger file is a 413)
BODY_LIMIT = 1024 * 1024  # and its max_request_bytes


def openai_config(llm: str, diffusion: str, finetune: str, **openai) -> dict:
    targets = {"llm_target": llm, "diffusion_target": diffusion, "finetune_target": finetune}
    return {"models": TEST_SERVER_CONFIG["models"], "openai": targets | openai}


def sdk_client(server: ServiceProcess, api_key: str = "no-key-needed", **options):
    """The SDK's client, retrying nothing: a test sees every status as the server sent it."""
    from openai import OpenAI

    return OpenAI(base_url=server.address, api_key=api_key, max_retries=0, timeout=600, **options)


def async_sdk_client(server: ServiceProcess, api_key: str = "no-key-needed"):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.address, api_key=api_key, max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def unreachable() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def api(llm_server, diffusion_server, finetune_stack, tmp_path_factory) -> Iterator[ServiceProcess]:
    """The API in front of the tiny stack: tiny-llm (with adapters), tiny-embed, tiny-sd, fine-tuning."""
    config = openai_config(
        llm_server.address,
        diffusion_server.address,
        finetune_stack.address,
        max_upload_bytes=UPLOAD_LIMIT,
        max_request_bytes=BODY_LIMIT,
    )
    server = spawn_openai(tmp_path_factory.mktemp("openai"), config)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_api(real_llm_server, unreachable, tmp_path_factory) -> Iterator[ServiceProcess]:
    """The API in front of an LLM service on SmolLM2-135M-Instruct (the other services are down)."""
    server = spawn_openai(
        tmp_path_factory.mktemp("openai-real"), openai_config(real_llm_server.address, unreachable, unreachable)
    )
    yield server
    server.stop()


@pytest.fixture
def client(api):
    return sdk_client(api)


@pytest.fixture
def real_client(real_api):
    return sdk_client(real_api)
