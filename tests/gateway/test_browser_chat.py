"""The Chat and System tabs in a real headless Chromium: what a person does there."""

from __future__ import annotations

import re

from tests.conftest import HELD_TOKENS, make_lora_adapter
from tests.gateway.browsing import (
    bot_messages,
    bot_text,
    chat_and_wait,
    chat_box_ready,
    fill_text,
    needs_chromium,
    open_page,
    open_sampling,
    open_tab,
    screenshot,
    send_chat,
    set_number,
    toast_text,
)
from tests.gateway.conftest import gateway_env, running_requests
from tests.harness import spawn_gateway, wait_for

pytestmark = needs_chromium


def test_chat_streams_a_reply(page):
    open_sampling(page)
    set_number(page, "chat-max-new-tokens", 24)
    send_chat(page, "Hello there")
    page.locator("#chat-history").get_by_text("Hello there").wait_for()
    wait_for(lambda: "Stopped because" in page.locator("#chat-note").inner_text(), 120, "the reply to finish")
    assert bot_text(page).strip(), "no reply was shown"
    screenshot(page, "chat")


def box_text(page) -> str:
    return page.locator("#chat-input textarea").input_value()


def pick_adapter(page, name: str) -> None:
    """Type an adapter name into the picker (it takes names it does not list: the service decides)."""
    field = page.locator("#chat-adapter input")
    field.fill(name)
    field.press("Enter")
    wait_for(lambda: field.input_value() == name, 60, f"the adapter picker to hold {name!r}")


def test_chat_recovers_after_each_bad_input_and_stop_still_works(page, llm_server):
    """Each bad input shows its message and leaves the tab as it was: the box usable (holding the message
    that failed), the conversation there, and the next message answered in the same page."""
    open_sampling(page)
    set_number(page, "chat-max-new-tokens", 8)
    chat_and_wait(page, "Hello there")
    bad_inputs = [  # (what to change, message, the error's words, how to undo the change)
        (lambda: None, "   ", "The message is empty", lambda: None),
        (
            lambda: set_number(page, "chat-max-new-tokens", 200_000),
            "Too long an answer",
            "Max new tokens must be between 1 and 131,072; it is 200,000.",
            lambda: set_number(page, "chat-max-new-tokens", 8),
        ),
        (lambda: pick_adapter(page, "no-such-adapter"), "With an adapter", "no-such-adapter",
         lambda: pick_adapter(page, "(base model)")),
    ]  # fmt: skip
    for turn, (change, message, expected, undo) in enumerate(bad_inputs, start=2):
        change()
        send_chat(page, message)
        wait_for(lambda: expected in toast_text(page, "error"), 60, f"the error {expected!r}")  # noqa: B023
        wait_for(lambda: chat_box_ready(page), 60, "the message box to take messages again")
        assert box_text(page) == message, "the message that failed is back in the box"
        assert page.locator("#chat-history").get_by_text("Hello there").is_visible(), "the conversation stays"
        assert bot_messages(page).count() == turn - 1, "a failed message leaves no turn behind"
        undo()
        chat_and_wait(page, f"Still there? ({turn})")
    screenshot(page, "chat-after-errors")

    wait_for(lambda: running_requests(llm_server) == 0, 60, "earlier tests' requests to end")
    set_number(page, "chat-max-new-tokens", HELD_TOKENS)
    page.locator("#chat-ignore-eos input").check()
    send_chat(page, "Go on forever")
    wait_for(lambda: bot_messages(page).count() == 5 and bot_text(page).strip(), 120, "streamed text to appear")
    assert running_requests(llm_server) == 1, "the request runs until stopped (100,000 tokens, EOS ignored)"
    page.locator("#chat-input .stop-button").click()
    wait_for(lambda: running_requests(llm_server) == 0, 60, "the LLM service to free the stopped request's slot")
    wait_for(lambda: chat_box_ready(page), 60, "the message box to take messages again after Stop")
    assert bot_text(page).strip(), "the stopped reply stays in the conversation"
    screenshot(page, "chat-stopped")


def test_the_system_tab_shows_each_services_health_and_a_new_adapter_when_opened(page, settings):
    open_tab(page, "System")
    services = page.locator("#system-services")
    wait_for(lambda: len(re.findall(r"(?<!NOT_)SERVING", services.inner_text())) == 3, 60, "every service's health")
    assert "made-a-moment-ago" not in page.locator("#system-adapters").inner_text()
    open_tab(page, "Chat")  # System's timer stops while another tab is shown
    make_lora_adapter(settings, "made-a-moment-ago", seed=7)
    open_tab(page, "System")  # opening the tab refreshes it
    wait_for(
        lambda: "made-a-moment-ago" in page.locator("#system-adapters").inner_text(), 60, "the new adapter in System"
    )
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
