"""`python -m shared.models prepare`: build the built-in models and download hf: ones, before serving.

Downloading is its own step, never a side effect of serving (unless `allow_downloads` is set).
"""

from __future__ import annotations

import argparse
import sys

from shared.loaders import prepare
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.models", description=__doc__)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--only", nargs="*", help="model names (default: every configured model)")
    parser.add_argument("--kind", choices=["llm", "diffusion"], help="only models of this kind")
    args = parser.parse_args(argv)
    settings = load_settings()
    for entry in settings.models:
        if (args.only and entry.name not in args.only) or (args.kind and entry.kind != args.kind):
            continue
        print(f"{entry.name}: {prepare(entry, settings)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
