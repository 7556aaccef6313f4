"""The Images and Fine-tune tabs in a real headless Chromium: what a person does there."""

from __future__ import annotations

import re

from tests.gateway.browsing import (
    WAIT_MS,
    choose,
    fill_text,
    needs_chromium,
    open_tab,
    screenshot,
    send_chat,
    set_number,
    toast_text,
)
from tests.harness import wait_for

pytestmark = needs_chromium


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
