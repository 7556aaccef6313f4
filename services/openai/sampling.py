"""What chat and text completions share: the sampling fields of OpenAI's requests (with ModelWorks' extras,
sent as extra body fields) and their translation to `SamplingParams`, finish reasons and usage.

Ranges are the LLM service's to check (one place validates each thing): a value it refuses is its
INVALID_ARGUMENT, a 400 naming the field. Only the shapes are checked here.
"""

from __future__ import annotations

from pydantic import Field

from modelworks.llm.v1 import llm_pb2
from services.openai.errors import invalid
from services.openai.schema import OpenAIBody

FINISH_REASONS = {
    llm_pb2.FINISH_REASON_LENGTH: "length",
    llm_pb2.FINISH_REASON_STOP: "stop",
    llm_pb2.FINISH_REASON_EOS: "stop",
    llm_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
MAX_CHOICES = 16  # n: each choice is a generation of its own (they share the prompt's cached prefix)


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class TextRequest(OpenAIBody):
    """The fields chat and text completions have in common."""

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # OpenAI's is an int64; taken modulo 2**64
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # ModelWorks' extras (vLLM's names where it has them)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    adapter: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None, top_logprobs: int | None, logprobs: bool, choice: int) -> dict:
        """`SamplingParams` fields; choice i of a seeded request gets seed + i, so the n choices differ."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        fields = {
            "max_new_tokens": max_tokens or 0,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or 0,
            "repetition_penalty": self.repetition_penalty,
            "stop": stop,
            "seed": None if self.seed is None else (self.seed + choice) % 2**64,
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "min_p": self.min_p,
            "logit_bias": _token_biases(self.logit_bias),
            "stop_token_ids": self.stop_token_ids or [],
            "min_new_tokens": self.min_tokens or 0,
            "logprobs": logprobs,
            "top_logprobs": top_logprobs or 0,
        }
        return {name: value for name, value in fields.items() if value is not None}


def _token_biases(logit_bias: dict[str, float] | None) -> dict[int, float]:
    biases = {}
    for token, bias in (logit_bias or {}).items():
        if not token.isdigit():
            raise invalid(f"logit_bias keys are token ids (as strings), got {token!r}", "logit_bias")
        biases[int(token)] = bias
    return biases


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_bytes(entry) -> list[int]:
    return list(entry.token_bytes or entry.token.encode())
