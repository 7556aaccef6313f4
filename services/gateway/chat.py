"""The Chat tab: streaming chat with history over `LLMService.GenerateStream`.

A message goes through three events, so that the tab stays usable after any error:
1. `prepare` checks the message and settings and builds the request. A bad input fails this event alone:
   its outputs are untouched, so the message stays in the box and the box stays usable; the error shows as
   a toast.
2. `answer` streams the reply. If the service fails (an unknown adapter, a stopped service), it first puts
   the conversation back as it was and the message back in the box, then raises the error to show it.
3. `settle` re-enables the box and commits the conversation, after success, failure and Stop alike
   (Gradio's browser code runs `.then` listeners only after success or a cancel, `.failure` ones after an
   error or a cancel, so it listens on both).
Stop cancels the stream: closing the generator cancels the gRPC call, and the LLM service frees its slot.
The `/chat` API endpoint is its own event with the same checks, history kept in the caller's session and a
default for every argument but the message.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import gradio as gr

from modelworks.finetune.v1 import finetune_pb2
from modelworks.llm.v1 import llm_pb2
from services.gateway.adapters import adapter_names
from services.gateway.chat_layout import ChatLayout, build_chat_layout
from services.gateway.chat_request import (
    BUILTIN_BANNER,
    NO_ADAPTER,
    ChatSettings,
    chat_models,
    chat_request,
    limits_of,
    model_limits,
)
from services.gateway.clients import ServiceClients
from services.gateway.errors import call_or_warn, user_errors
from services.gateway.streams import follow

REDRAW_S = 0.05  # at most 20 updates a second per chat: each one re-sends the reply to the browser
FINISH_WORDS = {
    llm_pb2.FINISH_REASON_EOS: "the model ended its answer",
    llm_pb2.FINISH_REASON_LENGTH: "the token limit was reached",
    llm_pb2.FINISH_REASON_STOP: "a stop string was generated",
    llm_pb2.FINISH_REASON_TOOL_CALLS: "the model called a tool",
}
GENERATING = "Generating…"
PRIVATE = {"api_visibility": "private"}


@dataclass
class ChatTab:
    pickers: list  # model, adapter, max new tokens, random-weights banner
    refresh_pickers: Callable  # (model, adapter) -> updates of `pickers`


@dataclass(frozen=True)
class Turn:
    """A checked message on its way to the service: what the box held, and the request made of it."""

    message: str
    request: llm_pb2.GenerateRequest


def call_text(call: llm_pb2.ToolCall) -> str:
    """A tool call as the chat shows it."""
    return f"\n\n🔧 Calls `{call.name}` with `{call.arguments}`"


def finish_note(event: llm_pb2.GenerateStreamResponse) -> str:
    why = FINISH_WORDS.get(event.finish_reason, "finished")
    usage = event.usage
    return (
        f"Stopped because {why} · {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} new · "
        f"seed {event.seed} (set it under Sampling to get this answer again)"
    )


def replies(clients: ServiceClients, request: llm_pb2.GenerateRequest) -> Iterator[tuple[str, str]]:
    """The reply so far and a note under it, as it streams; a failure is raised as a readable `gr.Error`."""
    reply, note, sent = "", GENERATING, 0.0
    with user_errors(clients.llm_service, "chat"):
        for event in follow(clients.llm.GenerateStream(request)):
            if event is not None:
                reply += event.text + "".join(call_text(c) for c in event.tool_calls)
                if event.finish_reason:
                    note = finish_note(event)
                elif time.monotonic() - sent < REDRAW_S:
                    continue  # tokens arriving faster than a person reads are sent together
            sent = time.monotonic()
            yield reply, note


def _user(message: str) -> dict:
    return {"role": "user", "content": message}


def _assistant(reply: str) -> dict:
    return {"role": "assistant", "content": reply}


def _box(**changes) -> gr.Textbox:
    """The message box ready for the next message (or, with changes, in another state)."""
    return gr.Textbox(**{"interactive": True, "submit_btn": True, "stop_btn": False, **changes})


def _settings_signature(fn: Callable) -> Callable:
    """Give `fn(message, history, *settings)` a signature naming each setting with its default, for the API
    page and for Gradio, which makes an argument optional where its component has a value or its default is
    None (see `Blocks.get_api_info`)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("message", kind), inspect.Parameter("history", kind, default=None)]
    parameters += [inspect.Parameter(f.name, kind, default=f.default) for f in fields(ChatSettings)]
    fn.__signature__ = inspect.Signature(parameters)
    return fn


def _handlers(clients: ServiceClients):
    """The event functions, closed over the service clients."""

    def prepare(message, history, *settings):
        """Check the message and settings; show the message in the conversation and lock the box."""
        values = ChatSettings(*settings)
        request = chat_request(message, history, values, model_limits(clients, values.model))
        locked = _box(value="", interactive=False, submit_btn=False, stop_btn=True)
        return locked, [*history, _user(message)], Turn(message, request)

    def answer(turn: Turn, history):
        shown = [*history, _user(turn.message)]
        try:
            for reply, note in replies(clients, turn.request):
                yield [*shown, _assistant(reply)], note, gr.skip()
        except gr.Error:
            yield history, "", gr.Textbox(value=turn.message)  # as before the message was sent
            raise

    def settle(shown, note):
        """The box ready again and the conversation as shown committed (with a stopped reply's text so far)."""
        return _box(), shown, "Stopped by you." if note == GENERATING else gr.skip()

    @_settings_signature
    def api_chat(message, history, *settings):
        """Answer `message` after this session's earlier turns, streaming the reply; returns (reply, note)."""
        values = ChatSettings(*settings)
        request = chat_request(message, history, values, model_limits(clients, values.model))
        reply = ""
        for reply, note in replies(clients, request):
            yield reply, gr.skip(), note
        yield reply, [*(history or []), _user(message.strip()), _assistant(reply)], note

    return prepare, answer, settle, api_chat


def _refresh(clients: ServiceClients) -> Callable:
    def refresh(current_model: str | None, current_adapter: str | None):
        """The pickers as the services see them now, keeping the current picks where they still exist."""
        models = call_or_warn(clients.llm_service, "list_models", lambda: chat_models(clients), [])
        names = [m.name for m in models]
        model = current_model if current_model in names else next((m.name for m in models if m.is_default), None)
        limits = limits_of(models, model)
        adapters = adapter_names(clients, finetune_pb2.JOB_KIND_LLM, model)
        adapter = current_adapter if current_adapter in adapters else NO_ADAPTER
        return (
            gr.Dropdown(choices=names, value=model),
            gr.Dropdown(choices=[NO_ADAPTER, *adapters], value=adapter),
            gr.Number(info=limits.hint),
            gr.Markdown(BUILTIN_BANNER, visible=limits.random_weights),
        )

    return refresh


def _wire_messages(layout: ChatLayout, clients: ServiceClients, concurrency_limit: int) -> None:
    prepare, answer, settle, api_chat = _handlers(clients)
    history, turn = gr.State([]), gr.State(None)
    chat = {"concurrency_limit": concurrency_limit, "concurrency_id": "chat"}
    sent = layout.box.submit(
        prepare, [layout.box, history, *layout.settings], [layout.box, layout.chatbot, turn],
        show_progress="hidden", concurrency_limit=None, **PRIVATE,
    )  # fmt: skip
    answered = sent.success(
        answer, [turn, history], [layout.chatbot, layout.note, layout.box], show_progress="hidden", **chat, **PRIVATE
    )
    for ended in (answered.then, answered.failure):
        ended(settle, [layout.chatbot, layout.note], [layout.box, history, layout.note], queue=False,
              show_progress="hidden", **PRIVATE)  # fmt: skip
    layout.box.stop(None, None, None, cancels=[answered], **PRIVATE)
    layout.chatbot.clear(lambda: [], None, history, queue=False, **PRIVATE)

    reply = gr.Textbox(visible=False)  # the API's answer; the browser shows it in the conversation
    gr.Button(visible=False).click(
        api_chat, [layout.box, history, *layout.settings], [reply, history, layout.note], api_name="chat", **chat
    )


def build_chat_tab(clients: ServiceClients, concurrency_limit: int) -> ChatTab:
    layout = build_chat_layout()
    _wire_messages(layout, clients, concurrency_limit)
    refresh = _refresh(clients)
    pickers = [layout.model, layout.adapter, layout.max_new_tokens, layout.banner]
    layout.refresh.click(refresh, [layout.model, layout.adapter], pickers, **PRIVATE)
    layout.model.input(refresh, [layout.model, layout.adapter], pickers, **PRIVATE)
    return ChatTab(pickers, refresh)
