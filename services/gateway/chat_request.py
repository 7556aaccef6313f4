"""What the Chat tab sends: its settings as one typed value, checked and turned into a `GenerateRequest`.

The order of `ChatSettings`' fields is the order of the settings components and of the `/chat` API's
arguments after the message, so a new setting is one field here and one component in `chat_layout`.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass, fields

import gradio as gr
import grpc

from modelworks.llm.v1 import llm_pb2
from services.gateway import validation
from services.gateway.clients import QUICK_CALL_S, ServiceClients

NO_ADAPTER = "(base model)"
DEFAULT_MAX_NEW_TOKENS = 256
UNKNOWN_LIMIT = 1_000_000  # where the service cannot say its limit, it checks the request itself
BUILTIN_BANNER = "⚠️ **built-in test model: random weights, for trying the plumbing**"


@dataclass(frozen=True)
class ChatSettings:
    """Everything beside the message that shapes an answer, as the form and the API give it (unchecked).

    The defaults are the form's; blank ones are None so that the API takes them as optional."""

    system_prompt: str | None = None
    model: str | None = None  # None or "": the service's default model
    adapter: str | None = NO_ADAPTER
    max_new_tokens: float | None = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = 0.7
    top_p: float | None = 1.0
    top_k: float | None = 0
    repetition_penalty: float | None = 1.0
    stop: str | None = None
    seed: float | None = -1
    ignore_eos: bool | None = False
    json_schema: str | None = None
    tools: str | None = None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def values(self) -> tuple:
        return astuple(self)


@dataclass(frozen=True)
class ModelLimits:
    """What the LLM service says about a model: its context and the most new tokens one request may ask for."""

    context_length: int = 0
    max_new_tokens_limit: int = 0
    source: str = ""

    @property
    def max_new_tokens(self) -> int:
        known = [n for n in (self.max_new_tokens_limit, self.context_length) if n]
        return min(known) if known else UNKNOWN_LIMIT

    @property
    def hint(self) -> str | None:
        if not self.max_new_tokens_limit:
            return None
        if self.context_length and self.max_new_tokens_limit >= self.context_length:
            return f"up to {self.context_length:,} less the prompt (the model's context)"
        shared = f" (prompt and answer share {self.context_length:,})" if self.context_length else ""
        return f"up to {self.max_new_tokens:,}{shared}"

    @property
    def random_weights(self) -> bool:
        return self.source.startswith("builtin:")


def chat_models(clients: ServiceClients) -> list[llm_pb2.ModelInfo]:
    """The LLM service's chat models (its embedding models do not chat); raises `grpc.RpcError`."""
    listed = clients.llm.ListModels(llm_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models
    return [m for m in listed if m.kind == "llm"]


def limits_of(models: list[llm_pb2.ModelInfo], name: str | None) -> ModelLimits:
    """The limits of the model called `name` (the default model when empty); unknown ones are zero."""
    info = next((m for m in models if (m.name == name if name else m.is_default)), None)
    if info is None:
        return ModelLimits()
    return ModelLimits(info.max_context_length, info.max_new_tokens_limit, info.source)


def model_limits(clients: ServiceClients, name: str | None) -> ModelLimits:
    """As `limits_of`, asking the service; unknown (the service checks alone) when it does not answer."""
    try:
        return limits_of(chat_models(clients), name)
    except grpc.RpcError:
        return ModelLimits()


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


def sampling_params(settings: ChatSettings, limits: ModelLimits) -> llm_pb2.SamplingParams:
    return llm_pb2.SamplingParams(
        max_new_tokens=validation.whole_number(settings.max_new_tokens, 1, limits.max_new_tokens, "Max new tokens"),
        temperature=validation.number_in_range(settings.temperature, 0, 5, "Temperature"),
        top_p=validation.number_in_range(settings.top_p, 0.01, 1, "Top-p"),
        top_k=validation.whole_number(settings.top_k, 0, 100_000, "Top-k"),
        repetition_penalty=validation.number_in_range(settings.repetition_penalty, 0.01, 100, "Repetition penalty"),
        stop=validation.stop_strings(settings.stop),
        seed=validation.optional_seed(settings.seed),
        ignore_eos=bool(settings.ignore_eos),
    )


def structured_output(json_schema: str | None, tools: str | None) -> dict:
    """The request fields for an optional JSON schema the answer must follow and optional tools (OpenAI's
    function definitions, with or without the {"type": "function", "function": ...} wrapper)."""
    fields_ = {}
    schema = validation.optional_json(json_schema, "The JSON schema", dict)
    if schema is not None:
        fields_["response_format"] = llm_pb2.ResponseFormat(json_schema=json.dumps(schema))
    listed = validation.optional_json(tools, "Tools", list)
    if listed:
        functions = [t.get("function", t) if isinstance(t, dict) else None for t in listed]
        if not all(isinstance(f, dict) and f.get("name") for f in functions):
            raise gr.Error('Each tool needs at least a "name".', print_exception=False)
        fields_["tools"] = [
            llm_pb2.Tool(
                name=str(f["name"]),
                description=str(f.get("description", "")),
                parameters=json.dumps(f["parameters"]) if f.get("parameters") else "",
            )
            for f in functions
        ]
    return fields_


def chat_request(
    message: str | None, history: list[dict], settings: ChatSettings, limits: ModelLimits
) -> llm_pb2.GenerateRequest:
    """The request for `message` after `history`; a `gr.Error` that says what to change when an input is bad."""
    text = validation.required_text(message, "The message")
    return llm_pb2.GenerateRequest(
        **structured_output(settings.json_schema, settings.tools),
        model=settings.model or "",
        adapter="" if settings.adapter in (None, "", NO_ADAPTER) else settings.adapter,
        messages=history_messages(history, settings.system_prompt or "", text),
        sampling=sampling_params(settings, limits),
    )
