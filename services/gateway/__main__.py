"""`python -m services.gateway --port 7860`: the Gradio web app, a client of the services' gRPC APIs only.

Service addresses, login, API key and load limits come from the environment (see `config.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from shared.logs import configure_logging

log = logging.getLogger("gateway")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    parser.add_argument(
        "--bind", metavar="ADDRESS", help="interface to listen on (default: MODELWORKS_BIND_ADDRESS, 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, help="HTTP port (0 picks a free one; default 7860)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 picks one, -1 disables; default 9105)")
    parser.add_argument("--ready-file", type=Path, help="write the bound ports here as JSON once serving")
    return parser.parse_args(argv)


def free_port(bind: str) -> int:
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


def main(argv=None) -> int | str:
    args = parse_args(argv)
    # Gradio must not phone home: this may run on a closed network (set before gradio is imported)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from services.gateway.config import GatewayConfig

    config = GatewayConfig.from_environ()
    configure_logging(
        "gateway", os.environ.get("MODELWORKS_LOG_LEVEL", "INFO"), os.environ.get("MODELWORKS_LOG_FORMAT", "json")
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests, one line each
    bind = config.bind_address if args.bind is None else args.bind
    refusal = config.exposure_refusal(bind)
    if refusal:  # before the heavy imports: a misconfigured deployment fails at once
        log.error(f"refusing to start: {refusal}")
        return f"error: {refusal}"
    from prometheus_client import start_http_server

    from services.gateway.app import build_app
    from services.gateway.clients import ServiceClients
    from services.gateway.finetune import MAX_WATCHERS
    from services.gateway.images import ImageFiles

    metrics_port = config.metrics_port if args.metrics_port is None else args.metrics_port
    if metrics_port >= 0:
        metrics_server, _ = start_http_server(metrics_port, addr=config.metrics_bind_address)
        metrics_port = metrics_server.server_port
    port = config.port if args.port is None else args.port
    port = port or free_port(bind)
    clients, files = ServiceClients(config), ImageFiles()
    app = build_app(clients, files)
    app.queue(default_concurrency_limit=config.concurrency_limit, max_size=config.max_queue_size)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    app.launch(
        server_name=bind,
        server_port=port,
        auth=config.credentials,
        auth_message="ModelWorks: log in with the account the operator set (MODELWORKS_GATEWAY_AUTH).",
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        ssr_mode=False,
        # every running event holds one of these (a job watcher for as long as its page is open)
        max_threads=4 * config.concurrency_limit + MAX_WATCHERS,
    )
    log.info(f"gateway serving on http://{bind}:{port} (LLM {config.llm_target}, diffusion "
             f"{config.diffusion_target}, fine-tune {config.finetune_target})")  # fmt: skip
    if args.ready_file:
        args.ready_file.write_text(json.dumps({"port": port, "metrics_port": metrics_port}))
    stop.wait()
    log.info("stopping")
    app.close()
    clients.close()
    files.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
