"""`python -m shared.models prepare`: build the built-in models, download hf: ones and convert GGUF
checkpoints, before serving.

Downloading and converting are their own step, never a side effect of serving (unless `allow_downloads`
is set). A model that cannot be prepared (a corrupt GGUF file, an architecture transformers cannot read)
is reported with what is wrong, and the command exits 2.
"""

from __future__ import annotations

import argparse
import sys

from shared.errors import ServiceError
from shared.loaders import prepare
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.models", description=__doc__)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--only", nargs="*", help="model names (default: every configured model)")
    parser.add_argument(
        "--kind", choices=["llm", "embedding", "diffusion", "controlnet"], help="only models of this kind"
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    failed = 0
    for entry in settings.models:
        if (args.only and entry.name not in args.only) or (args.kind and entry.kind != args.kind):
            continue
        print(f"{entry.name}: preparing {entry.source}", flush=True)
        try:
            print(f"{entry.name}: ready in {prepare(entry, settings)}", flush=True)
        except ServiceError as exc:
            print(f"{entry.name}: cannot be prepared: {exc.message}", file=sys.stderr, flush=True)
            failed += 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
