"""`python -m services.finetune.export ADAPTER [--format merged|gguf] [--gguf-type F16|BF16|Q8_0]`: write an LLM
adapter merged into its base, as a Hugging Face folder in safetensors or one GGUF file, into the data dir's
`exports/` (the settings are read as the services read them: `MODELWORKS_CONFIG`, `MODELWORKS_*`).

Exit codes: 0 written (its export.json on stdout with --json), 2 refused (the reason on stderr), 1 failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import asdict

from services.finetune.export.checks import DTYPES, FORMATS, GGUF_TYPES

EXIT_REFUSED = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.finetune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the adapter's name in the adapter store")
    parser.add_argument("--format", choices=FORMATS, default="merged")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="F16")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="merged: the weights' dtype (auto: the base checkpoint's)")  # fmt: skip
    parser.add_argument("--name", default="", help="the export's name (default: <adapter>-merged or -<gguf type>)")
    parser.add_argument("--owner", default="", help=argparse.SUPPRESS)  # the API key the fine-tune API exports for
    parser.add_argument("--json", action="store_true", help="print the export's metadata as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _stop)  # stopped by the API: unwind, so the staging folder is removed

    from services.finetune.export.merge import export_adapter
    from shared.errors import ServiceError
    from shared.loaders import disable_progress_bars
    from shared.settings import load_settings

    disable_progress_bars()
    try:
        info = export_adapter(
            load_settings(), args.adapter, args.format, args.gguf_type, args.dtype, args.name, args.owner
        )
    except ServiceError as exc:
        if args.json:  # the fine-tune API reads this line and answers with the code
            print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        print(f"refused: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(asdict(info)))
    else:
        size = info.total_bytes / 2**20
        print(f"export {info.name!r}: {len(info.files)} files, {size:,.1f} MiB ({info.format})")
    return 0


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
