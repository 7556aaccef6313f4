"""Driving the gateway in a real headless Chromium (Debian's `chromium`, through Playwright): the page helpers
the browser tests share. The `browser` and `page` fixtures are in this folder's conftest.

Each test saves a screenshot under test-artifacts/screenshots/ for people to look at. Where Chromium is
missing (it is a system package; `.ci/run` installs it) the browser tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
# as root Chromium needs --no-sandbox; the rest keep it from calling hosts this closed network refuses
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip
WAIT_MS = 180_000  # generous: CI machines are shared and busy

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does this), so the browser "
    "tests cannot run",
)


def open_page(browser, address: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(address)
    return page


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


def bot_messages(page):
    return page.locator("#chat-history [data-testid='bot']")


def bot_text(page) -> str:
    messages = bot_messages(page)
    return messages.last.inner_text() if messages.count() else ""


def chat_box_ready(page) -> bool:
    """The message box takes a new message: enabled, with its send button (not Stop) showing."""
    box = page.locator("#chat-input textarea")
    return box.is_enabled() and page.locator("#chat-input .submit-button").is_visible()


def chat_and_wait(page, text: str) -> str:
    """Send `text`, wait until its reply has finished streaming, and return the reply."""
    replies = bot_messages(page).count()
    send_chat(page, text)
    wait_for(lambda: bot_messages(page).count() == replies + 1 and chat_box_ready(page), 120, f"a reply to {text!r}")
    wait_for(lambda: "Stopped because" in page.locator("#chat-note").inner_text(), 60, "the reply's note")
    return bot_text(page)


def toast_text(page, kind: str = "") -> str:
    """The text of the toasts on screen; `kind` "error" or "warning" keeps only those."""
    toasts = page.locator(f".toast-body{'.' + kind if kind else ''}")
    return " ".join(toasts.all_inner_texts())


def open_sampling(page) -> None:
    """Show the sampling settings (open in the side panel from the start; opened if someone closed them)."""
    if not page.locator("#chat-max-new-tokens input").is_visible():
        page.get_by_text("Sampling", exact=True).click()
    page.locator("#chat-max-new-tokens input").wait_for()
