"""Sampling parameters as a client sends them, and their validated, defaulted form."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from shared.errors import InvalidArgument

MAX_STOP_STRINGS = 16
GREEDY_BELOW = 1e-5  # temperatures this small are greedy decoding (and would overflow the logits)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingRequest:
    """Fields as received; zero means "server default" for each."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class SamplingConfig:
    """Validated parameters of one generation; temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Limits:
    default_max_new_tokens: int
    max_new_tokens_limit: int
    context_length: int


def resolve_sampling(req: SamplingRequest, prompt_tokens: int, limits: Limits) -> SamplingConfig:
    """Apply defaults and check ranges; every error says what is allowed."""
    top_p = 1.0 if req.top_p is None else req.top_p
    repetition_penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    for name, value in (("temperature", req.temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if not math.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number")
    if req.temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0 (0 is greedy), got {req.temperature:g}")
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1] (1 turns it off), got {top_p:g}")
    if repetition_penalty <= 0:
        raise InvalidArgument(f"repetition_penalty must be > 0 (1 turns it off), got {repetition_penalty:g}")
    low, high = REPETITION_PENALTY_RANGE
    if not low <= repetition_penalty <= high:
        raise InvalidArgument(
            f"repetition_penalty must be in [{low:g}, {high:g}] (1 turns it off), got {repetition_penalty:g}"
        )
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(req.stop)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in req.stop):
        raise InvalidArgument(f"stop strings must be 1-{MAX_STOP_LENGTH} characters long")
    if prompt_tokens >= limits.context_length:
        raise InvalidArgument(
            f"the prompt is {prompt_tokens} tokens; this model's context is {limits.context_length} tokens, "
            "so the prompt must be shorter to leave room for output"
        )
    room = limits.context_length - prompt_tokens
    if req.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidArgument(f"max_new_tokens is {req.max_new_tokens}; the limit is {limits.max_new_tokens_limit}")
    if req.max_new_tokens > room:
        raise InvalidArgument(
            f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({req.max_new_tokens}) exceeds the model's "
            f"context of {limits.context_length} tokens; ask for at most {room} new tokens"
        )
    max_new_tokens = req.max_new_tokens or min(limits.default_max_new_tokens, room)
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if req.temperature < GREEDY_BELOW else req.temperature,
        top_p=top_p,
        top_k=req.top_k,
        repetition_penalty=repetition_penalty,
        stop=tuple(req.stop),
        **({"seed": req.seed} if req.seed is not None else {}),
        ignore_eos=req.ignore_eos,
    )
