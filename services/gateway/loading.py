"""What a tab runs when the page loads: a function and the components it reads and fills."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Loader:
    fn: Callable
    inputs: list
    outputs: list
