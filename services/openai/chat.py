"""`POST /v1/chat/completions`: OpenAI's chat request as `GenerateRequest`s (one per choice), and the
responses and stream chunks built from what the LLM service returns."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from modelworks.llm.v1 import llm_pb2
from services.openai.errors import invalid, not_supported, proto_values
from services.openai.sampling import FINISH_REASONS, TextRequest, token_bytes
from services.openai.schema import OpenAIBody

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class FunctionCall(OpenAIBody):
    name: str
    arguments: str = ""


class ToolCallIn(OpenAIBody):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(OpenAIBody):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(OpenAIBody):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(OpenAIBody):
    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchemaFormat(OpenAIBody):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(TextRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise not_supported(
                f"a {part.get('type')!r} content part", "the served models read text only", f"messages[{index}].content"
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _message(message: Message, index: int) -> llm_pb2.ChatMessage:
    role = ROLES.get(message.role)
    if role is None:
        raise invalid(
            f"messages[{index}].role is {message.role!r}; use system, developer, user, assistant or tool",
            f"messages[{index}].role",
        )
    calls = [
        llm_pb2.ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
        for call in message.tool_calls or []
    ]
    return llm_pb2.ChatMessage(
        role=role, content=_text_of(message.content, index), tool_calls=calls, tool_call_id=message.tool_call_id or ""
    )


def _response_format(fmt: ResponseFormat | None) -> llm_pb2.ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return llm_pb2.ResponseFormat(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:  # no schema: any JSON object, as OpenAI's
        return llm_pb2.ResponseFormat(json_object=True)
    return llm_pb2.ResponseFormat(json_schema=json.dumps(fmt.json_schema.schema_))


def _tools(tools: list[ToolDef] | None) -> list[llm_pb2.Tool]:
    return [
        llm_pb2.Tool(
            name=tool.function.name,
            description=tool.function.description,
            parameters=json.dumps(tool.function.parameters) if tool.function.parameters is not None else "",
        )
        for tool in tools or []
    ]


def _tool_choice(choice: str | dict[str, Any] | None) -> llm_pb2.ToolChoice | None:
    if choice is None:
        return None
    modes = {"auto": llm_pb2.ToolChoice.AUTO, "none": llm_pb2.ToolChoice.NONE, "required": llm_pb2.ToolChoice.REQUIRED}
    if isinstance(choice, str):
        if choice not in modes:
            raise invalid(f"tool_choice is {choice!r}; use auto, none, required or a function", "tool_choice")
        return llm_pb2.ToolChoice(mode=modes[choice])
    function = choice.get("function") if choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid('tool_choice as an object is {"type": "function", "function": {"name": ...}}', "tool_choice")
    return llm_pb2.ToolChoice(function=name)


def generate_requests(body: ChatCompletionRequest, model: str, adapter: str) -> list[llm_pb2.GenerateRequest]:
    """One request per choice (choice i of a seeded request samples with seed + i)."""
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    max_tokens = body.max_completion_tokens or body.max_tokens
    top_logprobs = body.top_logprobs if body.logprobs else None
    fields: dict[str, Any] = {
        "model": model,
        "adapter": adapter,
        "messages": messages,
        "tools": _tools(body.tools),
        "response_format": _response_format(body.response_format),
        "tool_choice": _tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    fields = {name: value for name, value in fields.items() if value is not None}
    with proto_values("request"):
        return [
            llm_pb2.GenerateRequest(
                **fields, sampling=llm_pb2.SamplingParams(**body.sampling(max_tokens, top_logprobs, body.logprobs, i))
            )
            for i in range(body.n)
        ]


def tool_calls(calls, start: int = 0, indexed: bool = False) -> list[dict]:
    out = []
    for offset, call in enumerate(calls):
        entry = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        out.append({"index": start + offset, **entry} if indexed else entry)
    return out


def logprobs(entries) -> dict:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": token_bytes(e),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": token_bytes(t)} for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def choice(index: int, reply: llm_pb2.GenerateResponse, with_logprobs: bool) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = tool_calls(reply.tool_calls)
        message["content"] = reply.text or None
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs(reply.logprobs) if with_logprobs else None,
        "finish_reason": FINISH_REASONS.get(reply.finish_reason, "stop"),
    }


def delta_choice(index: int, delta: dict, finish_reason: str | None = None, logprob_entries=None) -> dict:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs(logprob_entries) if logprob_entries else None,
        "finish_reason": finish_reason,
    }
