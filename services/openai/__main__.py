"""`python -m services.openai --port 8000`: OpenAI's HTTP API in front of the three services' gRPC APIs.

It reads the services' own config (`MODELWORKS_CONFIG`, env overrides): their keys, so a request's key is
checked here and passed on; the bind rule (loopback unless a key guards it); and the `openai:` section
(service addresses, limits). It never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from pathlib import Path

from shared.logs import configure_logging

log = logging.getLogger("openai")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.openai", description=__doc__)
    parser.add_argument("--bind", metavar="ADDRESS", help="interface to listen on (default: bind_address, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (0 picks a free one; default openai.port, 8000)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 picks one, -1 disables; default 9106)")
    parser.add_argument("--ready-file", type=Path, help="write the bound ports here as JSON once serving")
    return parser.parse_args(argv)


def _listen(bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind.strip("[]"), port))
    sock.listen(2048)
    return sock


async def _serve(server, sock: socket.socket, ready_file: Path | None, ports: dict) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        log.info(f"OpenAI API serving on http://{sock.getsockname()[0]}:{ports['port']}/v1")
        if ready_file:
            ready_file.write_text(json.dumps(ports))
    await task


def main(argv=None) -> int | str:
    args = parse_args(argv)
    from shared.settings import load_settings

    settings = load_settings()
    configure_logging("openai", settings.log_level, settings.log_format)
    bind = settings.bind_address if args.bind is None else args.bind
    refusal = settings.exposure_refusal(bind)
    if refusal:
        log.error(f"refusing to start: {refusal}")
        return f"error: {refusal}"
    import uvicorn

    from services.openai.app import build_app
    from shared.metrics import start_metrics_server

    config = settings.openai
    metrics_port = config.metrics_port if args.metrics_port is None else args.metrics_port
    metrics_port = start_metrics_server(metrics_port, settings.metrics_bind_address)
    sock = _listen(bind, config.port if args.port is None else args.port)
    ports = {"port": sock.getsockname()[1], "metrics_port": -1 if metrics_port is None else metrics_port}
    app = build_app(config, settings.key_ring())
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="asyncio",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
            limit_concurrency=None,
        )
    )
    asyncio.run(_serve(server, sock, args.ready_file, ports))
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
