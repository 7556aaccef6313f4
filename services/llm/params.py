"""Sampling parameters as a client sends them, and their validated, defaulted form."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.errors import InvalidArgument

MAX_STOP_STRINGS = 16
GREEDY_BELOW = 1e-5  # temperatures this small are greedy decoding (and would overflow the logits)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_STOP_LENGTH = 256
OPENAI_PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as OpenAI bounds them
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingRequest:
    """Fields as received; zero or None means "server default" for each."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    stop_token_ids: frozenset[int] = frozenset()
    min_new_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def counts_output(self) -> bool:
        """Whether the sampler must count the generated tokens (OpenAI's presence and frequency penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class Limits:
    default_max_new_tokens: int
    max_new_tokens_limit: int
    context_length: int
    vocab_size: int = 2**31  # token ids a request may name (logit_bias, stop_token_ids) are below this


def resolve_sampling(req: SamplingRequest, prompt_tokens: int, limits: Limits) -> SamplingConfig:
    """Apply defaults and check ranges; every error says what is allowed."""
    top_p = 1.0 if req.top_p is None else req.top_p
    repetition_penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    _check_distribution(req, top_p, repetition_penalty)
    _check_stops(req, limits)
    max_new_tokens = _max_new_tokens(req, prompt_tokens, limits)
    if req.min_new_tokens > max_new_tokens:
        raise InvalidArgument(
            f"min_new_tokens ({req.min_new_tokens}) must not exceed max_new_tokens ({max_new_tokens})"
        )
    if req.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if req.temperature < GREEDY_BELOW else req.temperature,
        top_p=top_p,
        top_k=req.top_k,
        repetition_penalty=repetition_penalty,
        stop=tuple(req.stop),
        **({"seed": req.seed} if req.seed is not None else {}),
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        min_p=req.min_p or 0.0,
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in req.logit_bias.items() if b != 0)),
        stop_token_ids=frozenset(req.stop_token_ids),
        min_new_tokens=req.min_new_tokens,
        logprobs=req.logprobs or req.top_logprobs > 0,
        top_logprobs=req.top_logprobs,
    )


def _check_distribution(req: SamplingRequest, top_p: float, repetition_penalty: float) -> None:
    """The fields that shape the next-token distribution: finite, and each in its range."""
    floats = {
        "temperature": req.temperature,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "min_p": req.min_p or 0.0,
    }
    for name, value in floats.items():
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
    low, high = OPENAI_PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        if not low <= floats[name] <= high:
            raise InvalidArgument(f"{name} must be in [{low:g}, {high:g}] (0 turns it off), got {floats[name]:g}")
    if not 0 <= floats["min_p"] <= 1:
        raise InvalidArgument(f"min_p must be in [0, 1] (0 turns it off), got {floats['min_p']:g}")
    _check_logit_bias(req.logit_bias)


def _check_logit_bias(logit_bias: Mapping[int, float]) -> None:
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(logit_bias)}")
    low, high = LOGIT_BIAS_RANGE
    for token, bias in logit_bias.items():
        if not (math.isfinite(bias) and low <= bias <= high):
            raise InvalidArgument(f"logit_bias[{token}] must be in [{low:g}, {high:g}], got {bias:g}")


def _check_stops(req: SamplingRequest, limits: Limits) -> None:
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(req.stop)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in req.stop):
        raise InvalidArgument(f"stop strings must be 1-{MAX_STOP_LENGTH} characters long")
    if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(req.stop_token_ids)}")
    for name, ids in (("stop_token_ids", req.stop_token_ids), ("logit_bias", tuple(req.logit_bias))):
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidArgument(f"{name} names token {bad[0]}; this model's token ids are 0-{limits.vocab_size - 1}")


def _max_new_tokens(req: SamplingRequest, prompt_tokens: int, limits: Limits) -> int:
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
    return req.max_new_tokens or min(limits.default_max_new_tokens, room)
