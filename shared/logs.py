"""Structured logging: one JSON object a line on stderr, or the same entry as a short line for people.

Both renderings come from one entry (`log_entry`), so the local stack can show a service's JSON lines to a
person exactly as that service would have printed them in text mode (`human_line`).
"""

from __future__ import annotations

import calendar
import json
import logging
import sys
import time

# attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field
_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_ENTRY_KEYS = ("ts", "level", "service", "logger", "msg", "exc")
# notices a user cannot act on: the CPU image deliberately ships no torchvision, and PIL does the job
_UNACTIONABLE = {"transformers.utils.import_utils": ("requires torchvision (not installed)",)}


def log_entry(record: logging.LogRecord, service: str) -> dict:
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "service": service,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS})
    return entry


def human_line(entry: dict) -> str:
    """`21:47:00 llm              model ready · model=tiny-llm`; the level is named from warnings up."""
    clock = time.strftime("%H:%M:%S", time.localtime(_epoch(entry.get("ts", ""))))
    level = str(entry.get("level", "info"))
    shown_level = f"{level.upper()} " if level not in ("debug", "info") else ""
    fields = " ".join(f"{k}={v}" for k, v in entry.items() if k not in _ENTRY_KEYS)
    line = f"{clock} {entry.get('service', '?'):<16} {shown_level}{entry.get('msg', '')}"
    line += f" · {fields}" if fields else ""
    return line + (f"\n{entry['exc']}" if entry.get("exc") else "")


def _epoch(ts: str) -> float:
    try:
        return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return time.time()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = log_entry(record, self.service)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return human_line(json.loads(super().format(record)))


class _DropUnactionable(logging.Filter):
    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.phrases)


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route every log record of this process to stderr in `fmt` (json or text), and drop library notices
    nobody can act on. Called once per process, from its entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, phrases in _UNACTIONABLE.items():
        logger = logging.getLogger(name)  # the same object the library gets when it is imported later
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, _DropUnactionable)]
        logger.addFilter(_DropUnactionable(phrases))
