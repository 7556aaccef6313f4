"""What commands print: JSON for scripts (`--json`), aligned columns for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message


def as_dict(message: Message) -> dict:
    """A message as JSON-ready data, with the proto's field names and its defaults (scripts need both)."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def print_json(value) -> None:
    if isinstance(value, Message):
        value = as_dict(value)
    elif isinstance(value, list):
        value = [as_dict(v) if isinstance(v, Message) else v for v in value]
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str = "(none)") -> None:
    rows = [[str(cell) for cell in row] for row in rows]
    if not rows:
        print(empty)
        return
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    for row in [list(headers), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def enum_name(value: str, prefix: str) -> str:
    """`JOB_STATE_RUNNING` -> `running`: enum values as people say them."""
    return value.removeprefix(prefix).lower()


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"
