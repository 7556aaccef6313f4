"""Constrained decoding with xgrammar: compiling a request's format once, and masking each step's logits.

A `GrammarCompiler` belongs to a served model (it holds the tokenizer's vocabulary as xgrammar sees it).
Compiling runs on the request's thread, never the engine's, under a time limit, and compiled grammars are
kept in an LRU keyed by their text, so a schema used again costs nothing. Each constrained sequence gets its
own `Constraint` (an xgrammar matcher); at every step the engine's sampler asks the constrained rows for
their allowed tokens as one bitmask and sets every other token's logit to -inf before anything else looks at
the row, so greedy, sampled and penalized rows all pick from what the grammar allows.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar

from shared.errors import InvalidArgument

# Whitespace xgrammar lets the model put between JSON tokens: bounded, so a model cannot emit endless spaces.
MAX_JSON_WHITESPACE = 4


@dataclass(frozen=True)
class FormatSpec:
    """What a request constrains its output to: `kind` is json_schema, json_object, regex, grammar or
    structural_tag (tool calls); `text` the schema, pattern or grammar."""

    kind: str
    text: str = ""


class GrammarCompiler:
    """Compiles `FormatSpec`s for one tokenizer, with an LRU of compiled grammars and a compile time limit."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int, max_compile_s: float, max_chars: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._cache: OrderedDict[FormatSpec, xgrammar.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._max_compile_s = max_compile_s
        self._max_chars = max_chars
        self._lock = threading.Lock()
        # one compile at a time: a compile past its limit keeps its worker until it ends, and is not repeated
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._slow: set[FormatSpec] = set()
        self.compiles = 0  # cold compiles so far (what the cache saved is the rest)

    @functools.cached_property
    def info(self) -> xgrammar.TokenizerInfo:
        """The vocabulary as xgrammar sees it, made on first use (half a second for a 49k vocabulary), so a
        model nobody constrains or asks logprobs of never pays it at start-up."""
        return xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size)

    @functools.cached_property
    def _compiler(self) -> xgrammar.GrammarCompiler:
        return xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, spec: FormatSpec) -> xgrammar.CompiledGrammar:
        """The compiled grammar of `spec`; INVALID_ARGUMENT naming what is wrong with it."""
        if len(spec.text) > self._max_chars:
            raise InvalidArgument(
                f"the {spec.kind} is {len(spec.text)} characters; the limit is {self._max_chars} "
                "(llm.max_grammar_chars)"
            )
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
            if spec in self._slow:
                raise self._too_slow(spec)
        future = self._pool.submit(self._compile_now, spec)
        try:
            compiled = future.result(timeout=self._max_compile_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._slow.add(spec)
            raise self._too_slow(spec) from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self.compiles += 1
        return compiled

    def _too_slow(self, spec: FormatSpec) -> InvalidArgument:
        return InvalidArgument(
            f"the {spec.kind} took longer than {self._max_compile_s:g} s to compile (llm.max_grammar_compile_s); "
            "simplify it (fewer alternatives, bounded repetitions)"
        )

    def _compile_now(self, spec: FormatSpec) -> xgrammar.CompiledGrammar:
        try:
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.text)
            if spec.kind == "grammar":
                return self._compiler.compile_grammar(spec.text)
            return self._compiler.compile_grammar(_escaped_json(_json_grammar(spec)))
        except InvalidArgument:
            raise
        except Exception as exc:  # xgrammar says what it could not parse or does not support
            raise InvalidArgument(f"the {spec.kind} cannot be used: {_first_line(exc)}") from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _json_grammar(spec: FormatSpec) -> xgrammar.Grammar:
    """The grammar of a JSON format: a schema, any object, or a structural tag (tool calls)."""
    if spec.kind == "json_schema":
        _check_json(spec.text, "json_schema")
        return xgrammar.Grammar.from_json_schema(spec.text, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
    if spec.kind == "json_object":
        return xgrammar.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE
        )
    if spec.kind == "structural_tag":
        return xgrammar.Grammar.from_structural_tag(spec.text)
    raise ValueError(f"unknown format kind {spec.kind!r}")


# xgrammar 0.2.8 writes the characters of a length-bounded JSON string as "anything but quote, backslash, CR
# and LF", which lets raw control characters into the string: invalid JSON that strict parsers refuse.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _escaped_json(grammar: xgrammar.Grammar) -> str:
    """The grammar's EBNF with JSON's rule for string characters (no raw control characters) everywhere."""
    return str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _check_json(text: str, what: str) -> None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"the {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict | bool):
        raise InvalidArgument(f"the {what} must be a JSON object (a JSON schema)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Constraint:
    """One sequence's place in its grammar: which tokens may come next, and whether it has ended."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, stop_token_ids: set[int] | frozenset[int]):
        """`stop_token_ids`: the model's end-of-sequence tokens, the only tokens allowed once the output is
        complete."""
        self.matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids))

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def mask_logits(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """Set to -inf, in place, every token the constraint of each listed row of `logits` (B, V) does not allow
    next; the other rows are untouched. The rows' masks are filled in parallel, on xgrammar's own threads."""
    bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    _batch_matcher().batch_fill_next_token_bitmask([c.matcher for c in constraints], bitmask, indices=rows)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


@functools.cache
def _batch_matcher() -> xgrammar.BatchGrammarMatcher:
    return xgrammar.BatchGrammarMatcher(max_threads="auto")
