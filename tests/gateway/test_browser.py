"""The gateway in a real headless Chromium (Debian's `chromium`, driven by Playwright): what a person does.

Each test saves a screenshot under test-artifacts/screenshots/ for people to look at. Where Chromium is
missing (it is a system package; `.ci/run` installs it) these tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import HELD_TOKENS
from tests.gateway.conftest import gateway_env, running_requests
from tests.harness import REPO_ROOT, spawn_gateway, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
# as root Chromium needs --no-sandbox; the rest keep it from calling hosts this closed network refuses
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip
WAIT_MS = 180_000  # generous: CI machines are shared and busy

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does this), so the browser "
    "tests cannot run",
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, address: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(address)
    return page


@pytest.fixture
def page(browser, gateway, request):
    page = open_page(browser, gateway.address)
    # the pickers are filled from the services once the page has loaded
    page.locator("#chat-model input").wait_for()
    wait_for(lambda: page.locator("#chat-model input").input_value() == "tiny-llm", 120, "the model picker to fill")
    yield page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        screenshot(page, f"failed-{request.node.name}")
    page.context.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page, elem_id: str, value) -> None:
    """Type a number into a field, and see that the field holds it. Typed again if it does not: on a busy
    machine a field still being mounted can drop what was typed into it (seen once in the suite: a job
    form sent its default max steps)."""
    field = page.locator(f"#{elem_id} input")

    def holds_it() -> bool:
        if field.input_value() != str(value):
            field.fill(str(value))
            field.press("Tab")
        return field.input_value() == str(value)

    wait_for(holds_it, 60, f"#{elem_id} to hold {value}")


def fill_text(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def choose(page, elem_id: str, option: str) -> None:
    """Pick the dropdown option whose label contains `option`."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()
    wait_for(lambda: option in page.locator(f"#{elem_id} input").input_value(), 60, f"{option!r} to be picked")


def send_chat(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def bot_text(page) -> str:
    messages = page.locator("#chat-history .message-row.bot-row, #chat-history [data-testid='bot']")
    return messages.last.inner_text() if messages.count() else ""


def toast_text(page, kind: str = "") -> str:
    """The text of the toasts on screen; `kind` "error" or "warning" keeps only those."""
    toasts = page.locator(f".toast-body{'.' + kind if kind else ''}")
    return " ".join(toasts.all_inner_texts())


def open_sampling(page) -> None:
    page.get_by_text("Sampling", exact=True).click()
    page.locator("#chat-max-new-tokens input").wait_for()


def test_chat_streams_a_reply(page):
    open_sampling(page)
    set_number(page, "chat-max-new-tokens", 24)
    send_chat(page, "Hello there")
    page.locator("#chat-history").get_by_text("Hello there").wait_for()
    wait_for(lambda: "Stopped because" in page.locator("#chat-note").inner_text(), 120, "the reply to finish")
    assert bot_text(page).strip(), "no reply was shown"
    screenshot(page, "chat")


def test_stop_cancels_the_stream_on_the_server(page, llm_server):
    wait_for(lambda: running_requests(llm_server) == 0, 60, "earlier tests' requests to end")
    open_sampling(page)
    set_number(page, "chat-max-new-tokens", HELD_TOKENS)
    page.locator("#chat-ignore-eos input").check()
    send_chat(page, "Go on forever")
    wait_for(lambda: len(bot_text(page).strip()) > 0, 120, "streamed text to appear")
    assert running_requests(llm_server) == 1, "the request runs until stopped (100,000 tokens, EOS ignored)"
    page.locator("#chat-input .stop-button").click()
    wait_for(lambda: running_requests(llm_server) == 0, 60, "the LLM service to free the stopped request's slot")
    screenshot(page, "chat-stopped")


def test_an_image_is_generated_into_the_gallery(page):
    open_tab(page, "Images")
    wait_for(lambda: page.locator("#images-model input").input_value() == "tiny-sd", 120, "the image model picker")
    fill_text(page, "images-prompt", "a red square")
    page.locator("#images-generate").click()
    page.locator("#images-gallery img").first.wait_for()
    assert re.search(r"seed\(s\) \d+", page.locator("#images-status").inner_text())
    screenshot(page, "images")


def test_a_bad_input_shows_a_clear_message(page):
    open_tab(page, "Images")
    fill_text(page, "images-prompt", "   ")
    page.locator("#images-generate").click()
    wait_for(lambda: "The prompt is empty" in toast_text(page, "error"), 60, "the error message")
    assert "Traceback" not in page.content()
    screenshot(page, "images-bad-input")


def plotted(page) -> int:
    """Train-loss points on the job's plot (one a step)."""
    line = page.locator("#ft-loss-plot polyline.loss-train")
    return int(line.get_attribute("data-points")) if line.count() else 0


def create_job_in_form(page, adapter: str, max_steps: int) -> None:
    fill_text(page, "ft-adapter-name", adapter)
    set_number(page, "ft-max-steps", max_steps)
    page.locator("#ft-create").click()
    wait_for(lambda: adapter in page.locator("#ft-created").inner_text(), 60, f"job {adapter} to be created")
    created = page.locator("#ft-created").inner_text()
    assert f"in {max_steps} steps" in created, f"the form sent other max steps than {max_steps}: {created}"


def test_a_fine_tune_job_shows_its_loss_curve_grow_and_can_be_cancelled(page):
    open_tab(page, "Fine-tune")
    wait_for(lambda: page.locator("#ft-base-model input").input_value() == "tiny-llm", 120, "the base models")
    choose(page, "ft-dataset", "Zephyr lighthouse facts")  # other tests upload datasets too
    page.get_by_text("Hyperparameters (0 or blank").click()
    create_job_in_form(page, "browser-endless", 100_000)  # far more steps than the test waits for
    first = wait_for(lambda: plotted(page), 300, "the first loss points")
    wait_for(lambda: plotted(page) > first, 300, "the loss curve to grow")
    screenshot(page, "finetune-running")
    page.locator("#ft-cancel").click()
    wait_for(lambda: "cancelled" in page.locator("#ft-progress").inner_text(), 120, "the job to be cancelled")
    assert page.locator("#ft-use-in-chat").is_hidden()


def test_a_finished_fine_tune_job_opens_chat_with_its_adapter(page):
    open_tab(page, "Fine-tune")
    wait_for(lambda: page.locator("#ft-base-model input").input_value() == "tiny-llm", 120, "the base models")
    choose(page, "ft-dataset", "Zephyr lighthouse facts")
    page.get_by_text("Hyperparameters (0 or blank").click()
    create_job_in_form(page, "browser-lighthouse", 60)
    page.locator("#ft-use-in-chat").wait_for(state="visible", timeout=WAIT_MS * 2)
    assert plotted(page) == 60, "every step's loss is on the plot"
    assert page.locator("#ft-loss-plot polyline.loss-validation").count() == 1
    assert "succeeded" in page.locator("#ft-progress").inner_text()
    screenshot(page, "finetune-succeeded")
    page.locator("#ft-use-in-chat").click()
    wait_for(
        lambda: page.locator("#chat-adapter input").input_value() == "browser-lighthouse", 60, "the adapter picked"
    )
    send_chat(page, "Who keeps the Zephyr lighthouse?")
    wait_for(lambda: "Stopped because" in page.locator("#chat-note").inner_text(), 120, "the adapter's reply")
    screenshot(page, "chat-with-adapter")


def test_the_system_tab_shows_each_services_health(page):
    open_tab(page, "System")
    services = page.locator("#system-services")
    wait_for(lambda: len(re.findall(r"(?<!NOT_)SERVING", services.inner_text())) == 3, 60, "every service's health")
    screenshot(page, "system")


def test_a_stopped_service_shows_a_clear_message_and_other_tabs_work(
    browser, diffusion_server, finetune_stack, unreachable_target, tmp_path
):
    env = gateway_env(unreachable_target, diffusion_server.address, finetune_stack.address)
    gateway = spawn_gateway(tmp_path, env)
    page = open_page(browser, gateway.address)
    try:
        wait_for(lambda: "is not reachable" in toast_text(page, "warning"), 60, "the warning about the LLM service")
        assert not toast_text(page, "error")
        send_chat(page, "hello")
        wait_for(lambda: f"{unreachable_target} is not reachable" in toast_text(page, "error"), 60, "the chat error")
        screenshot(page, "llm-stopped")
        open_tab(page, "Images")
        wait_for(lambda: page.locator("#images-model input").input_value() == "tiny-sd", 120, "the image model picker")
        fill_text(page, "images-prompt", "a blue circle")
        page.locator("#images-generate").click()
        page.locator("#images-gallery img").first.wait_for()
        open_tab(page, "System")
        wait_for(lambda: "UNREACHABLE" in page.locator("#system-services").inner_text(), 60, "the LLM health")
        screenshot(page, "llm-stopped-system")
    finally:
        page.context.close()
        assert gateway.stop() == 0
