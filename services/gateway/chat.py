"""The Chat tab: streaming chat with history over `LLMService.GenerateStream`.

Model and adapter pickers come from `ListModels` (LLM service) and `ListAdapters` (fine-tune service);
Stop closes the generator, which cancels the stream, so the LLM service frees the request's slot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from modelworks.finetune.v1 import finetune_pb2
from modelworks.llm.v1 import llm_pb2
from services.gateway import validation
from services.gateway.adapters import adapter_names
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import call_or_warn, user_errors
from services.gateway.streams import follow

NO_ADAPTER = "(base model)"
REDRAW_S = 0.05  # at most 20 updates a second per chat: each one re-sends the reply to the browser
DEFAULT_MAX_NEW_TOKENS = 256
FINISH_WORDS = {
    llm_pb2.FINISH_REASON_EOS: "the model ended its answer",
    llm_pb2.FINISH_REASON_LENGTH: "the token limit was reached",
    llm_pb2.FINISH_REASON_STOP: "a stop string was generated",
    llm_pb2.FINISH_REASON_TOOL_CALLS: "the model called a tool",
}


@dataclass
class ChatTab:
    pickers: list  # model, adapter, max new tokens
    refresh_pickers: Callable  # (model, adapter) -> updates of `pickers`


def history_messages(history: list[dict], system_prompt: str, message: str) -> list[llm_pb2.ChatMessage]:
    """The conversation as the LLM service takes it: system prompt, past turns, the new message."""
    messages = [llm_pb2.ChatMessage(role="system", content=system_prompt.strip())] if system_prompt.strip() else []
    for turn in history or []:
        role, text = turn.get("role"), _text_of(turn.get("content"))
        if role in ("user", "assistant") and text:
            messages.append(llm_pb2.ChatMessage(role=role, content=text))
    messages.append(llm_pb2.ChatMessage(role="user", content=message))
    return messages


def _text_of(content) -> str:
    """Gradio gives a turn's content as a string or as a list of parts; files and components carry no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    return ""


def sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, ignore_eos):
    return llm_pb2.SamplingParams(
        max_new_tokens=validation.whole_number(max_new_tokens, 1, 1_000_000, "Max new tokens"),
        temperature=validation.number_in_range(temperature, 0, 5, "Temperature"),
        top_p=validation.number_in_range(top_p, 0.01, 1, "Top-p"),
        top_k=validation.whole_number(top_k, 0, 100_000, "Top-k"),
        repetition_penalty=validation.number_in_range(repetition_penalty, 0.01, 100, "Repetition penalty"),
        stop=validation.stop_strings(stop),
        seed=validation.optional_seed(seed),
        ignore_eos=bool(ignore_eos),
    )


def structured_output(json_schema: str | None, tools: str | None) -> dict:
    """The request fields for an optional JSON schema the answer must follow and optional tools (OpenAI's
    function definitions, with or without the {"type": "function", "function": ...} wrapper)."""
    fields = {}
    schema = validation.optional_json(json_schema, "The JSON schema", dict)
    if schema is not None:
        fields["response_format"] = llm_pb2.ResponseFormat(json_schema=json.dumps(schema))
    listed = validation.optional_json(tools, "Tools", list)
    if listed:
        functions = [t.get("function", t) if isinstance(t, dict) else None for t in listed]
        if not all(isinstance(f, dict) and f.get("name") for f in functions):
            raise gr.Error('Each tool needs at least a "name".', print_exception=False)
        fields["tools"] = [
            llm_pb2.Tool(
                name=str(f["name"]),
                description=str(f.get("description", "")),
                parameters=json.dumps(f["parameters"]) if f.get("parameters") else "",
            )
            for f in functions
        ]
    return fields


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


def sampling_inputs() -> tuple:
    """The sampling settings, in a closed accordion: max new tokens, temperature, top-p, top-k, repetition
    penalty, seed, stop strings, ignore end of sequence."""
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            max_new_tokens = gr.Number(
                value=DEFAULT_MAX_NEW_TOKENS, precision=0, label="Max new tokens", elem_id="chat-max-new-tokens"
            )
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 is greedy")
            top_p = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p")
        with gr.Row():
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 is off")
            repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty")
            seed = gr.Number(label="Seed", value=-1, precision=0, info="-1 draws one", elem_id="chat-seed")
        stop = gr.Textbox(label="Stop strings", lines=2, info="one a line; \\n stands for a newline")
        ignore_eos = gr.Checkbox(
            label="Ignore end of sequence", info="keep generating to the token limit", elem_id="chat-ignore-eos"
        )
    return max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, ignore_eos


def structured_output_inputs() -> tuple[gr.Code, gr.Code]:
    """The optional JSON schema and tools boxes, in their own accordion under the sampling settings."""
    with gr.Accordion("Structured output and tools", open=False):
        with gr.Row():
            json_schema = gr.Code(
                label="JSON schema", language="json", lines=4, elem_id="chat-json-schema",
            )  # fmt: skip
            tools = gr.Code(label="Tools", language="json", lines=4, elem_id="chat-tools")
        gr.Markdown(
            "Optional. With a **JSON schema** every answer is JSON that follows it. **Tools** is a JSON list of "
            'functions the model may call (`[{"name": ..., "description": ..., "parameters": {JSON schema}}]`); '
            "its calls show in the chat, their arguments checked against the schema."
        )
    return json_schema, tools


def build_chat_tab(clients: ServiceClients, concurrency_limit: int) -> ChatTab:
    llm = clients.llm_service

    def respond(
        message, history, system_prompt, model, adapter, max_new_tokens, temperature, top_p, top_k,
        repetition_penalty, stop, seed, ignore_eos, json_schema=None, tools=None,
    ) -> Iterator[tuple[str, str]]:  # fmt: skip
        text = validation.required_text(message, "The message")
        request = llm_pb2.GenerateRequest(
            **structured_output(json_schema, tools),
            model=model or "",
            adapter="" if adapter in (None, "", NO_ADAPTER) else adapter,
            messages=history_messages(history, system_prompt or "", text),
            sampling=sampling_params(
                max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, ignore_eos
            ),
        )
        reply, note, sent = "", "Generating…", 0.0
        with user_errors(llm, "chat"):
            for event in follow(clients.llm.GenerateStream(request)):
                if event is not None:
                    reply += event.text + "".join(call_text(c) for c in event.tool_calls)
                    if event.finish_reason:
                        note = finish_note(event)
                    elif time.monotonic() - sent < REDRAW_S:
                        continue  # tokens arriving faster than a person reads are sent together
                sent = time.monotonic()
                yield reply, note

    def refresh(current_model: str | None, current_adapter: str | None):
        def list_models():
            listed = clients.llm.ListModels(llm_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models
            return [m for m in listed if m.kind == "llm"]  # embedding models do not chat

        models = call_or_warn(llm, "list_models", list_models, [])
        names = [m.name for m in models]
        model = current_model if current_model in names else next((m.name for m in models if m.is_default), None)
        context = next((m.max_context_length for m in models if m.name == model), 0)
        adapters = adapter_names(clients, finetune_pb2.JOB_KIND_LLM, model)
        adapter = current_adapter if current_adapter in adapters else NO_ADAPTER
        return (
            gr.Dropdown(choices=names, value=model),
            gr.Dropdown(choices=[NO_ADAPTER, *adapters], value=adapter),
            gr.Number(info=f"up to {context:,} with the prompt" if context else None),
        )

    with gr.Row():
        # choices arrive from the services after load; API callers may name any model (the service checks)
        model = gr.Dropdown(label="Model", choices=[], scale=3, allow_custom_value=True, elem_id="chat-model")
        adapter = gr.Dropdown(
            label="Adapter", choices=[NO_ADAPTER], value=NO_ADAPTER, scale=3, allow_custom_value=True,
            elem_id="chat-adapter",
            info="LoRA adapters trained for this model",
        )  # fmt: skip
        refresh_button = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="chat-refresh")
    system_prompt = gr.Textbox(label="System prompt", lines=2, placeholder="Optional: how the assistant should behave")
    max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, ignore_eos = sampling_inputs()
    json_schema, tools = structured_output_inputs()
    note = gr.Markdown(elem_id="chat-note")
    gr.ChatInterface(
        respond,
        additional_inputs=[
            system_prompt, model, adapter, max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed,
            ignore_eos, json_schema, tools,
        ],
        additional_outputs=[note],
        chatbot=gr.Chatbot(label="Chat", height=420, elem_id="chat-history"),
        textbox=gr.Textbox(
            placeholder="Message the model…", show_label=False, submit_btn=True, stop_btn=True, elem_id="chat-input"
        ),
        api_name="chat",
        concurrency_limit=concurrency_limit,
        fill_height=False,
    )  # fmt: skip
    pickers = [model, adapter, max_new_tokens]
    refresh_button.click(refresh, [model, adapter], pickers, api_visibility="private")
    model.input(refresh, [model, adapter], pickers, api_visibility="private")
    return ChatTab(pickers, refresh)
