"""The Chat and System tabs in a real headless Chromium: what a person does there."""

from __future__ import annotations

import re

from tests.conftest import HELD_TOKENS
from tests.gateway.browsing import (
    bot_text,
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
