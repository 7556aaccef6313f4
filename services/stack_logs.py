"""Where the local stack's processes write: each one's whole output to its own file under `<data dir>/logs/`,
and to the terminal only what a person running `make run` needs.

Services log JSON (one entry a line). In `text` mode the terminal gets a short line for each warning and
error and for the milestones below; library output that is not JSON (Redis' banner, a library's own
handler) stays in the file, and when a process dies its last lines are printed. In `json` mode every line
goes to the terminal as the process wrote it, as a container's log collector wants.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from shared.logs import human_line

MILESTONES = frozenset(
    {
        "model ready",
        "converting a GGUF checkpoint",
        "worker ready",
        "job created",
        "job started",
        "job ended",
        "resumed from a checkpoint",
    }
)
MAX_FILE_BYTES = 20 * 1024 * 1024  # then the file moves to <name>.log.1 and a new one starts
TAIL_LINES = 20


def terminal_line(line: str, fmt: str) -> str | None:
    """What the terminal shows of one line a process wrote, or None."""
    if fmt == "json":
        return line
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    if entry.get("level") in ("warning", "error", "critical") or entry.get("msg") in MILESTONES:
        return human_line(entry)
    return None


def readable(line: str) -> str:
    """A line as a person reads it: a JSON entry as its short line, anything else as written."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    return human_line(entry) if isinstance(entry, dict) else line


class LogRelay:
    """Copies one process's output (a pipe) line by line into its log file and, filtered, to `echo`."""

    def __init__(self, name: str, source: IO[bytes], folder: Path, fmt: str, echo: Callable[[str], None]):
        self.name, self.path, self.fmt, self.echo = name, folder / f"{name}.log", fmt, echo
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._source = source
        self._thread = threading.Thread(target=self._copy, name=f"log-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _copy(self) -> None:
        out = self.path.open("ab")
        for raw in iter(self._source.readline, b""):
            if out.tell() + len(raw) > MAX_FILE_BYTES:
                out.close()
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                out = self.path.open("ab")
            out.write(raw)
            out.flush()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            shown = terminal_line(line, self.fmt)
            if shown is not None:
                self.echo(shown)
        out.close()


def print_line(text: str) -> None:
    """The terminal's one writer: lines from several relays never interleave mid-line."""
    with _PRINT_LOCK:
        print(text, file=sys.stderr, flush=True)


_PRINT_LOCK = threading.Lock()
