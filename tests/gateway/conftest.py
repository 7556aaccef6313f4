"""The gateway for real: a `python -m services.gateway` process in front of real LLM, diffusion and fine-tune
services (with a `redis-server` and a Celery worker), reached over HTTP by `gradio_client` and Chromium."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import ServiceProcess, free_port, spawn_gateway


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
def gateway(llm_server, diffusion_server, finetune_stack, tmp_path_factory) -> Iterator[ServiceProcess]:
    env = gateway_env(
        llm_server.address,
        diffusion_server.address,
        finetune_stack.address,
        MODELWORKS_LLM_METRICS_URL=f"http://127.0.0.1:{llm_server.metrics_port}/metrics",
        MODELWORKS_DIFFUSION_METRICS_URL=f"http://127.0.0.1:{diffusion_server.metrics_port}/metrics",
        MODELWORKS_FINETUNE_METRICS_URL=f"http://127.0.0.1:{finetune_stack.metrics_port}/metrics",
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


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for one test module: Playwright's sync API holds an event loop on the main thread
    while it runs, so it must end before later tests call `asyncio.run`."""
    from playwright.sync_api import sync_playwright

    from tests.gateway.browsing import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, gateway, request):
    """A fresh page on the shared gateway, once its pickers are filled; screenshotted if the test fails."""
    from tests.gateway.browsing import open_page, screenshot
    from tests.harness import wait_for

    page = open_page(browser, gateway.address)
    # the pickers are filled from the services once the page has loaded (its load events queue behind whatever the
    # shared gateway still runs for earlier pages: generous on a busy machine)
    page.locator("#chat-model input").wait_for()
    wait_for(lambda: page.locator("#chat-model input").input_value() == "tiny-llm", 300, "the model picker to fill")
    yield page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        screenshot(page, f"failed-{request.node.name}")
    page.context.close()
