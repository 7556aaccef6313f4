"""The Images and Fine-tune tabs in a real headless Chromium: what a person does there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.gateway.browsing import (
    SCREENSHOTS,
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
# an <img>'s natural size and the size its pixels are painted at in its box, after CSS object-fit
PAINTED_SIZE = """img => {
    const box = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
    const contain = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    const scale = {"scale-down": Math.min(1, contain), contain: contain, none: 1}[fit] ?? NaN;
    return [[img.naturalWidth, img.naturalHeight], [img.naturalWidth * scale, img.naturalHeight * scale]];
}"""


def test_an_image_is_generated_into_the_gallery(page):
    open_tab(page, "Images")
    wait_for(lambda: page.locator("#images-model input").input_value() == "tiny-sd", 120, "the image model picker")
    # tiny-sd is built in with random weights, and the page says so
    wait_for(lambda: page.locator("#images-banner").is_visible(), 60, "the random-weights banner")
    assert "random weights" in page.locator("#images-banner").inner_text()
    wait_for(lambda: "classifier-free guidance" in page.locator("#images-model-info").inner_text(), 60, "model info")
    assert "sd · classifier-free guidance · negative prompt · text2img, img2img, inpaint" in (
        page.locator("#images-model-info").inner_text()
    )
    fill_text(page, "images-prompt", "a red square")
    page.locator("#images-generate").click()
    image = page.locator("#images-gallery img").first
    image.wait_for()
    assert re.search(r"seed\(s\) \d+", page.locator("#images-status").inner_text())
    # a small image is shown at its own size, not blown up to fill its tile
    natural, painted = image.evaluate(PAINTED_SIZE)
    assert painted == natural == [64, 64], f"a {natural} image is painted at {painted}"
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


def y_tick_labels(page) -> list[str]:
    return page.locator("#ft-loss-plot text.y-tick").all_inner_texts()


def picked_job_label(page) -> str:
    return page.locator("#ft-job input").input_value()


def table_state(page, adapter: str) -> str:
    """The state cell of the jobs table's row for `adapter` (Gradio draws rows as div[role=row] of gridcells)."""
    row = page.locator("#ft-jobs div[role=row]", has_text=adapter)
    return row.first.locator("[role=gridcell]").nth(4).inner_text().strip() if row.count() else ""


def open_form(page) -> None:
    open_tab(page, "Fine-tune")
    wait_for(lambda: page.locator("#ft-base-model input").input_value() == "tiny-llm", 120, "the base models")
    choose(page, "ft-dataset", "Zephyr lighthouse facts")  # other tests upload datasets too


def create_job_in_form(page, adapter: str, max_steps: int) -> None:
    fill_text(page, "ft-adapter-name", adapter)
    set_number(page, "ft-max-steps", max_steps)
    page.locator("#ft-create").click()
    wait_for(lambda: adapter in page.locator("#ft-created").inner_text(), 60, f"job {adapter} to be created")
    created = page.locator("#ft-created").inner_text()
    assert f"in {max_steps} steps" in created, f"the form sent other max steps than {max_steps}: {created}"


def test_the_job_form_shows_the_basic_fields_and_keeps_the_rest_under_advanced(page):
    open_form(page)
    for basic in ("ft-adapter-name", "ft-method", "ft-epochs", "ft-max-steps", "ft-learning-rate"):
        assert page.locator(f"#{basic}").is_visible(), f"#{basic} is not among the basic fields"
    assert page.locator("#ft-lora-r").is_hidden(), "the advanced fields start closed"
    screenshot(page, "finetune-form")
    page.get_by_text("Advanced (0 or blank").click()
    page.locator("#ft-lora-r").wait_for()
    screenshot(page, "finetune-advanced")


def test_a_fine_tune_job_shows_its_loss_curve_grow_and_can_be_cancelled(page):
    open_form(page)
    create_job_in_form(page, "browser-endless", 100_000)  # far more steps than the test waits for
    first = wait_for(lambda: plotted(page), 300, "the first loss points")
    wait_for(lambda: plotted(page) > first, 300, "the loss curve to grow")
    screenshot(page, "finetune-running")
    page.locator("#ft-cancel").click()
    wait_for(lambda: "cancelled" in page.locator("#ft-progress").inner_text(), 120, "the job to be cancelled")
    assert page.locator("#ft-use-in-chat").is_hidden()


@pytest.mark.timeout(600)  # a job, an export (a process that merges and writes a GGUF) and a chat reply
def test_a_finished_fine_tune_job_opens_chat_with_its_adapter(page):
    open_form(page)
    create_job_in_form(page, "browser-lighthouse", 60)
    page.locator("#ft-use-in-chat").wait_for(state="visible", timeout=WAIT_MS * 2)
    assert plotted(page) == 60, "every step's loss is on the plot"
    assert page.locator("#ft-loss-plot polyline.loss-validation").count() == 1
    # the header, the picker and the table say the same once the job has ended (the watcher sends them together)
    assert "succeeded" in page.locator("#ft-progress").inner_text()
    wait_for(lambda: " · succeeded · " in picked_job_label(page), 60, "the job picker to say succeeded")
    wait_for(lambda: table_state(page, "browser-lighthouse") == "succeeded", 60, "the jobs table to say succeeded")
    assert len(y_tick_labels(page)) > 2, f"the loss axis labels only {y_tick_labels(page)}"
    screenshot(page, "finetune-succeeded")
    page.locator("#ft-loss-plot").screenshot(path=str(SCREENSHOTS / "finetune-loss-plot.png"))
    page.locator("#ft-log-scale input").check()
    wait_for(lambda: "log scale" in page.locator("#ft-loss-plot").inner_text(), 60, "the plot on a log scale")
    assert plotted(page) == 60 and len(y_tick_labels(page)) > 2
    page.locator("#ft-loss-plot").screenshot(path=str(SCREENSHOTS / "finetune-loss-plot-log.png"))
    export_and_download(page, "GGUF Q8_0")
    page.locator("#ft-use-in-chat").click()
    wait_for(
        lambda: page.locator("#chat-adapter input").input_value() == "browser-lighthouse", 60, "the adapter picked"
    )
    send_chat(page, "Who keeps the Zephyr lighthouse?")
    wait_for(lambda: "Stopped because" in page.locator("#chat-note").inner_text(), 120, "the adapter's reply")
    screenshot(page, "chat-with-adapter")


def export_and_download(page, choice: str) -> None:
    """Export the succeeded job's adapter from its view, and download the file the page offers."""
    assert page.locator("#ft-export").is_visible(), "a succeeded LLM job offers an export"
    choose(page, "ft-export-choice", choice)
    page.locator("#ft-export").click()
    wait_for(lambda: "Exported" in page.locator("#ft-export-note").inner_text(), 300, "the export")
    assert "browser-lighthouse-q8_0" in page.locator("#ft-export-note").inner_text()
    with page.expect_download() as download:
        page.locator("#ft-export-file a").first.click()
    assert Path(download.value.path()).read_bytes()[:4] == b"GGUF", "the download is the GGUF file"
    screenshot(page, "finetune-exported")
