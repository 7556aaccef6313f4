"""The command line every gRPC service shares: `python -m services.<name> [--port N] [--metrics-port N] ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from shared.allocator import keep_freed_memory_for_reuse
from shared.errors import ServiceError
from shared.logs import configure_logging
from shared.serving import ServerOptions
from shared.settings import Settings, load_settings


def run_service(
    name: str, description: str, serve: Callable[[Settings, ServerOptions], Awaitable[int]], argv=None
) -> None:
    """Parse arguments, build the settings once, serve, and exit with the service's exit code.

    Ports default to the config's `<name>` section."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=description)
    parser.add_argument(
        "--config", type=Path, help="YAML config (default: $MODELWORKS_CONFIG or config/modelworks.yaml)"
    )
    parser.add_argument("--bind", metavar="ADDRESS", help="interface to listen on (default: bind_address, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (0 picks a free one; default from the config)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 picks one, -1 disables)")
    parser.add_argument("--ready-file", type=Path, help="write the bound ports here as JSON once serving")
    args = parser.parse_args(argv)

    keep_freed_memory_for_reuse()
    settings = load_settings(args.config)
    configure_logging(name, settings.log_level, settings.log_format)
    check_required_gpu(settings)
    section = getattr(settings, name)
    options = ServerOptions(
        bind_address=settings.bind_address if args.bind is None else args.bind,
        metrics_bind_address=settings.metrics_bind_address,
        port=section.port if args.port is None else args.port,
        metrics_port=section.metrics_port if args.metrics_port is None else args.metrics_port,
        ready_file=args.ready_file,
        max_message_bytes=section.max_message_bytes,
        max_concurrent_rpcs=section.max_concurrent_rpcs,
    )
    try:
        code = asyncio.run(serve(settings, options))
    except ServiceError as error:  # a model that cannot be served as configured: the reason, not a traceback
        logging.getLogger(__name__).error(f"cannot serve: {error}")
        code = 1
    sys.exit(code)


def check_required_gpu(settings: Settings) -> None:
    """Exit with the reason when the settings require a GPU and none is usable (torch loads only then)."""
    if not settings.require_gpu:
        return
    from shared.devices import require_usable_gpu

    try:
        name = require_usable_gpu()
    except RuntimeError as error:
        logging.getLogger(__name__).error("no usable GPU", extra={"reason": str(error)})
        sys.exit(f"error: {error}")
    logging.getLogger(__name__).info("GPU checked", extra={"device": name})
