"""Checks on what a person typed, before any call: each failure is a `gr.Error` that says what to change.

The services check everything again (the gateway is one client of many); checking here first saves a
round trip and words the message for the form rather than for the API.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import gradio as gr

from shared.adapters import ADAPTER_NAME_RE, ADAPTER_NAME_RULE

MAX_SEED = 2**64 - 1


def plain(number: float) -> str:
    """A number as people write it: 4,096, 0.01, 1,000,000 (never 1e+06 or 4096.0)."""
    if isinstance(number, int) or (math.isfinite(number) and number == int(number)):
        return f"{int(number):,}"
    if not math.isfinite(number):
        return str(number)
    return format(Decimal(repr(float(number))), ",f")


def required_text(value: str | None, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise gr.Error(f"{what} is empty: type something first.", print_exception=False)
    return text


def number_in_range(value: float | None, low: float, high: float, what: str) -> float:
    if value is None or not math.isfinite(float(value)):
        raise gr.Error(f"{what} must be a number between {plain(low)} and {plain(high)}.", print_exception=False)
    if not low <= float(value) <= high:
        raise gr.Error(
            f"{what} must be between {plain(low)} and {plain(high)}; it is {plain(float(value))}.",
            print_exception=False,
        )
    return float(value)


def whole_number(value: float | None, low: int, high: int, what: str) -> int:
    number = number_in_range(value, low, high, what)
    if number != int(number):
        raise gr.Error(f"{what} must be a whole number; it is {plain(number)}.", print_exception=False)
    return int(number)


def optional_seed(value: float | None) -> int | None:
    """-1 (or blank) means "draw one", as in AUTOMATIC1111; the reply says which, to reproduce it."""
    if value is None or value == "" or value == -1:
        return None
    if value != int(value) or not 0 <= value <= MAX_SEED:
        raise gr.Error(
            f"Seed must be -1 (draw one) or a whole number from 0 to {plain(MAX_SEED)}.", print_exception=False
        )
    return int(value)


def image_side(value: float | None, what: str, low: int = 64, high: int = 2048) -> int:
    side = whole_number(value, low, high, what)
    if side % 8:
        raise gr.Error(
            f"{what} must be a multiple of 8 (the model works in 8-pixel blocks); it is {side}.", print_exception=False
        )
    return side


def stop_strings(text: str | None) -> list[str]:
    """One stop string a line; `\\n` in a line stands for a newline."""
    lines = [line.replace("\\n", "\n") for line in (text or "").splitlines()]
    stops = [line for line in lines if line]
    if len(stops) > 16:
        raise gr.Error("At most 16 stop strings.", print_exception=False)
    return stops


def adapter_name(value: str | None) -> str:
    name = required_text(value, "Adapter name")
    if not ADAPTER_NAME_RE.match(name) or ".." in name:
        raise gr.Error(f"Adapter name {name!r} is not allowed: use {ADAPTER_NAME_RULE}.", print_exception=False)
    return name


def optional_json(value: str | None, what: str, kind: type) -> object | None:
    """JSON text a person pasted: None when blank, else parsed and of `kind` (dict or list)."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise gr.Error(f"{what} is not valid JSON: {exc}.", print_exception=False) from None
    if not isinstance(parsed, kind):
        shape = "an object ({...})" if kind is dict else "a list ([...])"
        raise gr.Error(f"{what} must be {shape}.", print_exception=False)
    return parsed
