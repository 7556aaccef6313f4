"""Offline training text for the built-in tokenizers: the Python standard library's own source."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

CORPUS_FILES = 400


def stdlib_corpus(files: int = CORPUS_FILES) -> Iterator[str]:
    """Text of the first stdlib modules in sorted order: the same on every machine with this Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:files]:
        yield path.read_text(encoding="utf-8", errors="replace")
