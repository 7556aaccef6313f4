"""How a model family writes tool calls: the grammar that makes its calls parse, and the parser that reads them.

Each `ToolFormat` knows the text a call starts with (its trigger), the structural tag that constrains a call's
arguments to the tool's JSON schema (xgrammar: free text until the trigger, then exactly one of the tools'
calls), and how to read a complete call back out of the text. The formats:

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen 2.5/3, Hermes, SmolLM3, and
  our own instructions for templates that know no tools);
- `llama3`: a bare `{"name": ..., "parameters": {...}}` object (Llama 3.1-3.3 JSON tool calling);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from xgrammar.structural_tag import (
    ConstStringFormat,
    JSONSchemaFormat,
    SequenceFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from services.llm.grammar import MAX_JSON_WHITESPACE

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class Call:
    """A parsed call: the function's name and its arguments as a JSON object."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolFormat:
    name: str
    trigger: str  # the text every call starts with
    arguments_key: str  # the call object's key for the arguments
    opening: str = ""  # before the call objects (mistral's "[TOOL_CALLS][")
    closing: str = ""  # after them
    separator: str = "\n"  # between calls in one output
    end_tag: str = ""  # after each call object (hermes' closing tag)
    begin_tag: str = ""  # before each call object

    # -- the grammar -----------------------------------------------------------------------------------

    def structural_tag(self, tools: list[tuple[str, dict]], mode: str, parallel: bool = True) -> str:
        """The structural tag (JSON) for `tools` ((name, parameters schema)) under a tool choice `mode`: auto
        (free text, calls once the trigger appears), required (calls only, at least one) or a single forced
        tool (pass just that one, mode "function")."""
        if mode == "auto":
            tags = [
                self._tag(name, schema, self.opening + self.begin_tag, self.end_tag + self.closing)
                for name, schema in tools
            ]
            fmt = TriggeredTagsFormat(triggers=[self.trigger], tags=tags, stop_after_first=not parallel)
        else:
            tags = [self._tag(name, schema, self.begin_tag, self.end_tag) for name, schema in tools]
            calls = TagsWithSeparatorFormat(
                tags=tags,
                separator=self.separator,
                at_least_one=True,
                stop_after_first=mode == "function" or not parallel,
            )
            opening = [ConstStringFormat(value=self.opening)] if self.opening else []
            closing = [ConstStringFormat(value=self.closing)] if self.closing else []
            fmt = SequenceFormat(elements=[*opening, calls, *closing])
        return StructuralTag(format=fmt).model_dump_json()

    def _tag(self, name: str, schema: dict, before: str, after: str) -> TagFormat:
        return TagFormat(
            begin=f'{before}{{"name": {json.dumps(name)}, "{self.arguments_key}": ',
            content=JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=MAX_JSON_WHITESPACE),
            end="}" + after,
        )

    # -- reading calls back ----------------------------------------------------------------------------

    def read_calls(self, text: str) -> tuple[list[Call], int] | None:
        """`text` starts with the trigger: the complete calls at its start and how many characters they take,
        or None while they are incomplete (or do not parse)."""
        pos = 0
        if self.opening:
            if not text.startswith(self.opening):
                return None
            pos = len(self.opening)
        calls = []
        while True:
            begin, end = self.begin_tag.strip(), self.end_tag.strip()
            if begin:
                if not text.startswith(begin, pos):
                    return None
                pos = _SPACE.match(text, pos + len(begin)).end()
            try:
                value, pos = _DECODER.raw_decode(text, pos)
            except ValueError:
                return None
            call = self._call_of(value)
            if call is None:
                return None
            calls.append(call)
            if end:
                pos = _SPACE.match(text, pos).end()
                if not text.startswith(end, pos):
                    return None
                pos += len(end)
            separator, after = self.separator.strip(), _SPACE.match(text, pos).end()
            if not (separator and text.startswith(separator, after)):
                break
            pos = _SPACE.match(text, after + len(separator)).end()
        if self.closing:
            pos = _SPACE.match(text, pos).end()
            if not text.startswith(self.closing, pos):
                return None
            pos += len(self.closing)
        return calls, pos

    def after_calls(self, text: str) -> str | None:
        """`text` that follows complete calls, without the whitespace and separator before the next call; None
        while it is all whitespace or part of a separator (the next text decides)."""
        rest = text.lstrip()
        separator = self.separator.strip()
        if separator and rest.startswith(separator):
            rest = rest[len(separator) :].lstrip()
        elif separator and separator.startswith(rest):
            return None
        return rest or None

    def _call_of(self, value) -> Call | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get(self.arguments_key, value.get("arguments", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        return Call(value["name"], arguments) if isinstance(arguments, dict) else None

    # -- prompting -------------------------------------------------------------------------------------

    def render_calls(self, calls: list[Call]) -> str:
        """Calls as this format writes them: for an assistant turn a template cannot render itself."""
        objects = [
            f"{self.begin_tag}{json.dumps({'name': c.name, self.arguments_key: c.arguments})}{self.end_tag}"
            for c in calls
        ]
        if self.opening:
            return self.opening + ", ".join(o for o in objects) + self.closing
        return self.separator.join(objects)

    def instructions(self, tools: list[dict]) -> str:
        """A system prompt that describes `tools` (OpenAI's function shape) and how to call them, for chat
        templates that do not render tools themselves."""
        listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        example = self.render_calls([Call("<function-name>", {"<argument>": "<value>"})])
        return (
            "You may call one or more functions to assist with the user query. The functions you can call are "
            f"listed here, one JSON object each:\n{listed}\n\nTo call a function, answer with exactly this and "
            f"nothing else, arguments as a JSON object that follows the function's parameters:\n{example}"
        )


HERMES = ToolFormat(
    "hermes", trigger="<tool_call>", arguments_key="arguments", begin_tag="<tool_call>\n", end_tag="\n</tool_call>"
)
LLAMA3 = ToolFormat("llama3", trigger='{"name": ', arguments_key="parameters", separator="; ")
MISTRAL = ToolFormat(
    "mistral", trigger="[TOOL_CALLS]", arguments_key="arguments", opening="[TOOL_CALLS][", closing="]", separator=", "
)
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL)}


def detect(chat_template: str | None) -> ToolFormat:
    """The format a chat template's own tool support uses; hermes (our instructions) when it has none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES
