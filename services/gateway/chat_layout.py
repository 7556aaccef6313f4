"""The Chat tab's components: the conversation first, its settings in a side panel beside it.

Only layout lives here; `chat.py` wires the events. `ChatLayout.settings` lists the settings components in
the order of `ChatSettings`' fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from services.gateway.chat_request import DEFAULT_MAX_NEW_TOKENS, NO_ADAPTER, ChatSettings


@dataclass
class ChatLayout:
    model: gr.Dropdown
    adapter: gr.Dropdown
    refresh: gr.Button
    banner: gr.Markdown  # shown while the picked model has random weights
    chatbot: gr.Chatbot
    box: gr.Textbox
    note: gr.Markdown
    settings: list  # in `ChatSettings` order

    @property
    def max_new_tokens(self) -> gr.Number:
        return self.settings[ChatSettings.names().index("max_new_tokens")]


def build_chat_layout() -> ChatLayout:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=480):
            model, adapter, refresh = _pickers()
            banner = gr.Markdown(visible=False, elem_id="chat-banner")
            chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat-history")
            box = gr.Textbox(
                placeholder="Message the model…", show_label=False, submit_btn=True, stop_btn=False,
                elem_id="chat-input",
            )  # fmt: skip
            note = gr.Markdown(elem_id="chat-note")
        with gr.Column(scale=1, min_width=320, elem_id="chat-settings"):
            system_prompt = gr.Textbox(
                label="System prompt", lines=2, placeholder="Optional: how the assistant should behave"
            )
            sampling = _sampling_inputs()
            json_schema, tools = _structured_output_inputs()
    by_name = {"system_prompt": system_prompt, "model": model, "adapter": adapter, "json_schema": json_schema,
               "tools": tools, **sampling}  # fmt: skip
    settings = [by_name[name] for name in ChatSettings.names()]
    return ChatLayout(model, adapter, refresh, banner, chatbot, box, note, settings)


def _pickers() -> tuple[gr.Dropdown, gr.Dropdown, gr.Button]:
    with gr.Row(equal_height=False):
        # choices arrive from the services after load; API callers may name any model (the service checks)
        model = gr.Dropdown(label="Model", choices=[], scale=3, allow_custom_value=True, elem_id="chat-model")
        adapter = gr.Dropdown(
            label="Adapter", choices=[NO_ADAPTER], value=NO_ADAPTER, scale=3, allow_custom_value=True,
            elem_id="chat-adapter", info="LoRA adapters trained for this model",
        )  # fmt: skip
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="chat-refresh")
    return model, adapter, refresh


def _sampling_inputs() -> dict[str, gr.components.Component]:
    """The sampling settings, by `ChatSettings` field name."""
    with gr.Accordion("Sampling", open=True):
        inputs = {
            "max_new_tokens": gr.Number(
                value=DEFAULT_MAX_NEW_TOKENS, precision=0, label="Max new tokens", elem_id="chat-max-new-tokens"
            ),
            "temperature": gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 is greedy"),
            "top_p": gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p"),
            "top_k": gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 is off"),
            "repetition_penalty": gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty"),
            "seed": gr.Number(label="Seed", value=-1, precision=0, info="-1 draws one", elem_id="chat-seed"),
            "stop": gr.Textbox(label="Stop strings", lines=2, info="one a line; \\n stands for a newline"),
            "ignore_eos": gr.Checkbox(
                label="Ignore end of sequence", info="keep generating to the token limit", elem_id="chat-ignore-eos"
            ),
        }
    return inputs


def _structured_output_inputs() -> tuple[gr.Code, gr.Code]:
    """The optional JSON schema and tools boxes, in their own accordion under the sampling settings."""
    with gr.Accordion("Structured output and tools", open=False):
        json_schema = gr.Code(label="JSON schema", language="json", lines=4, elem_id="chat-json-schema")
        tools = gr.Code(label="Tools", language="json", lines=4, elem_id="chat-tools")
        gr.Markdown(
            "Optional. With a **JSON schema** every answer is JSON that follows it. **Tools** is a JSON list of "
            'functions the model may call (`[{"name": ..., "description": ..., "parameters": {JSON schema}}]`); '
            "its calls show in the chat, their arguments checked against the schema."
        )
    return json_schema, tools
