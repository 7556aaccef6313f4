"""`python -m services.llm --port 50051`: serve the configured LLMs over gRPC."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from shared.logs import configure_logging
from shared.serving import ServerOptions
from shared.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.llm", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="YAML config (default: $MODELWORKS_CONFIG or config/modelworks.yaml)"
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, help="gRPC port (0 picks a free one; default from config: 50051)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 picks one, -1 disables; default 9101)")
    parser.add_argument("--ready-file", type=Path, help="write the bound ports here as JSON once serving")
    args = parser.parse_args(argv)

    settings = load_settings(args.config)
    configure_logging("llm", settings.log_level, settings.log_format)
    options = ServerOptions(
        host=args.host,
        port=settings.llm.port if args.port is None else args.port,
        metrics_port=settings.llm.metrics_port if args.metrics_port is None else args.metrics_port,
        ready_file=args.ready_file,
    )
    from services.llm.app import serve  # imports torch and transformers: after argument errors

    asyncio.run(serve(settings, options))


if __name__ == "__main__":
    main()
