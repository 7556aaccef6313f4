"""The options every command takes (targets, API key, --json), accepted before or after the command's name."""

from __future__ import annotations

import argparse
import functools
import os

from modelworks_cli.connection import SERVICE_TITLES, default_target


def _unsigned(bits: int):
    """An argparse type for a proto `uint32`/`uint64` field: out of range is a usage error, not a traceback."""
    largest = 2**bits - 1

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 0 <= value <= largest:
            raise argparse.ArgumentTypeError(f"{value} is out of range: from 0 to {largest:,}")
        return value

    return parse


count = _unsigned(32)  # steps, tokens, sizes: the protos' uint32 fields
seed_number = _unsigned(64)


def add_global_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """With `suppress`, an option left out does not override the value given before the command."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    for service, title in SERVICE_TITLES.items():
        env = f"MODELWORKS_{service.upper()}_TARGET"
        parser.add_argument(
            f"--{service}-target",
            default=default(default_target(service)),
            metavar="HOST:PORT",
            help=f"the {title} service (default: ${env} or {default_target(service)})",
        )
    parser.add_argument(
        "--api-key",
        default=default(os.environ.get("MODELWORKS_API_KEY", "")),
        help="sent as 'authorization: Bearer <key>' (default: $MODELWORKS_API_KEY; none without keys configured)",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")


@functools.cache
def command_options() -> argparse.ArgumentParser:
    """A parent for each command's parser: `modelworks models list --json` works as `modelworks --json models list`."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")
    add_global_options(group, suppress=True)
    return parent
