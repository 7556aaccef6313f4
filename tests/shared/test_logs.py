"""One log entry, two renderings: JSON for files and collectors, a short line for people; and what the local
stack shows of a process's output on the terminal."""

from __future__ import annotations

import json
import logging

from services.stack_logs import readable, terminal_line
from shared.logs import JsonFormatter, TextFormatter, configure_logging


def record(msg: str, level: int = logging.INFO, name: str = "shared.hosting", **extra) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    made.__dict__.update(extra)
    return made


def test_text_is_the_json_entry_as_one_short_line():
    entry = json.loads(JsonFormatter("llm").format(record("model ready", model="tiny-llm")))
    assert entry["service"] == "llm" and entry["msg"] == "model ready" and entry["model"] == "tiny-llm"
    line = TextFormatter("llm").format(record("model ready", model="tiny-llm"))
    assert line.endswith("llm              model ready · model=tiny-llm")
    assert "WARNING disk nearly full" in TextFormatter("llm").format(record("disk nearly full", logging.WARNING))


def test_the_stack_shows_warnings_and_milestones_not_chatter_or_library_output():
    def line(msg, level="info"):
        return json.dumps({"ts": "2026-01-01T00:00:00.000Z", "level": level, "service": "llm", "msg": msg})

    assert "model ready" in terminal_line(line("model ready"), "text")
    assert "ERROR cannot serve" in terminal_line(line("cannot serve", "error"), "text")
    assert terminal_line(line("grpc server started"), "text") is None
    assert terminal_line("Loading weights: 100%|██████████| 84/84", "text") is None
    assert terminal_line("Loading weights: 100%", "json") == "Loading weights: 100%"  # a collector gets it all
    assert readable(line("stopped")).endswith("llm              stopped")
    assert readable("plain output") == "plain output"


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_notice_nobody_can_act_on_is_dropped_and_others_are_kept():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logger = logging.getLogger("transformers.utils.import_utils")  # where transformers says it
    kept = Kept()
    try:
        configure_logging("diffusion", "INFO", "json")
        logger.addHandler(kept)  # on the logger itself: transformers stops its records from propagating
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to the PIL one")
        logger.warning("something else worth reading")
    finally:
        logger.removeHandler(kept)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert kept.messages == ["something else worth reading"]
