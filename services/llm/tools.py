"""Tool calling: the tools a request offers, its tool choice, and the calls read out of the generated text.

A request's tools are checked here (names, schemas, counts), rendered into the prompt by the served model,
and turned into a structural tag that the engine enforces like any other grammar (`tool_formats.py`). The
text the engine streams back goes through a `ToolCallStream`, which passes plain text on, holds back a call
from its trigger until the call is complete, and hands it on as a `ToolCall`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from services.llm.grammar import FormatSpec
from services.llm.tool_formats import ToolFormat
from shared.errors import InvalidArgument

MAX_TOOLS = 128  # as OpenAI allows
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NO_ARGUMENTS = {"type": "object", "properties": {}}
CHOICES = ("auto", "none", "required", "function")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict

    def as_openai(self) -> dict:
        """The shape chat templates (and OpenAI) expect."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # one of CHOICES
    function: str = ""  # with mode "function"
    parallel: bool = True  # several calls in one response


AUTO = ToolChoice()


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


def parse_tools(raw: list[tuple[str, str, str]]) -> list[ToolSpec]:
    """(name, description, parameters JSON text) as received, checked; every error names the tool."""
    if len(raw) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools are allowed, got {len(raw)}")
    tools, names = [], set()
    for i, (name, description, parameters) in enumerate(raw):
        if not TOOL_NAME.match(name):
            raise InvalidArgument(f"tools[{i}].name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if name in names:
            raise InvalidArgument(f"tools[{i}].name {name!r} is given twice")
        names.add(name)
        schema = NO_ARGUMENTS
        if parameters:
            try:
                schema = json.loads(parameters)
            except ValueError as exc:
                raise InvalidArgument(f"tools[{i}].parameters ({name}) is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidArgument(f"tools[{i}].parameters ({name}) must be a JSON schema object")
        tools.append(ToolSpec(name, description, schema))
    return tools


def offered_tools(tools: list[ToolSpec], choice: ToolChoice) -> list[ToolSpec]:
    """The tools the model is shown: none for NONE, all otherwise; a forced function must be one of them."""
    if choice.mode not in CHOICES:
        raise InvalidArgument(f"tool_choice must be one of {', '.join(CHOICES)}")
    if choice.mode == "function" and choice.function not in {t.name for t in tools}:
        raise InvalidArgument(f"tool_choice names function {choice.function!r}, which is not among the tools")
    if choice.mode == "required" and not tools:
        raise InvalidArgument("tool_choice REQUIRED needs at least one tool")
    return [] if choice.mode == "none" else tools


def tool_grammar(fmt: ToolFormat, tools: list[ToolSpec], choice: ToolChoice) -> FormatSpec:
    """The structural tag that makes every call parse and its arguments follow the tool's schema."""
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.function]
    tag = fmt.structural_tag([(t.name, t.parameters) for t in chosen], choice.mode, choice.parallel)
    return FormatSpec("structural_tag", tag)


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


class ToolCallStream:
    """Splits streamed text into plain text and complete tool calls, as the text arrives."""

    def __init__(self, fmt: ToolFormat):
        self._format = fmt
        self._pending = ""
        self._in_call = False
        self._after_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add new text; return the plain text now certain and the calls completed by it."""
        self._pending += text
        released, calls = [], []
        while True:
            if not self._in_call:
                if self._after_call:  # whitespace and separators between calls (or after the last) are not text
                    rest = self._format.after_calls(self._pending)
                    if rest is None:
                        break
                    self._pending = rest
                start = self._pending.find(self._format.trigger)
                if start < 0:
                    keep = _partial_suffix(self._pending, self._format.trigger)
                    text, self._pending = (
                        self._pending[: len(self._pending) - keep],
                        self._pending[len(self._pending) - keep :],
                    )
                    released.append(text)
                    self._after_call = self._after_call and not text
                    break
                released.append(self._pending[:start])
                self._after_call = self._after_call and start == 0
                self._pending, self._in_call = self._pending[start:], True
            read = self._format.read_calls(self._pending)
            if read is None:
                break
            done, used = read
            calls.extend(ToolCall(new_call_id(), c.name, json.dumps(c.arguments, ensure_ascii=False)) for c in done)
            self._pending, self._in_call, self._after_call = self._pending[used:], False, True
        return "".join(released), calls

    def flush(self) -> str:
        """At the end: text held back that never became a call (a call cut short is returned as text)."""
        rest, self._pending, self._in_call = self._pending, "", False
        return "" if self._after_call and self._format.after_calls(rest) is None else rest


def _partial_suffix(text: str, trigger: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `trigger`."""
    for n in range(min(len(trigger) - 1, len(text)), 0, -1):
        if text.endswith(trigger[:n]):
            return n
    return 0
