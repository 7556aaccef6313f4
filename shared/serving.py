"""The gRPC server bootstrap every service uses.

A `GrpcService` is started with its servicers registered; it then serves health (NOT_SERVING until the
service says it is ready), reflection, the shared interceptor (API key, error mapping, metrics), optional
TLS, and Prometheus metrics on an HTTP port. SIGTERM or SIGINT stops it gracefully: health turns
NOT_SERVING, new calls are refused, in-flight calls get a grace period, then the service's own
shutdown hook runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.hosting import ModelHost
from shared.interceptors import ServiceInterceptor
from shared.metrics import start_metrics_server
from shared.settings import Settings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Large enough for images and dataset chunks; every service shares it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = 0
    metrics_port: int = -1
    ready_file: Path | None = None  # written with the bound ports once the service is ready


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])


class GrpcService:
    """One gRPC server process: register servicers, `start`, `set_ready`, then `wait_for_termination`."""

    def __init__(self, settings: Settings, options: ServerOptions, service_names: list[str]):
        self.settings = settings
        self.options = options
        self.service_names = service_names
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(api_key)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        address = f"{self.options.host}:{self.options.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"could not bind the gRPC port {address}")
        for name in ["", *self.service_names]:
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
        self.metrics_port = start_metrics_server(self.options.metrics_port)
        log.info("grpc server started", extra={"port": self.port, "metrics_port": self.metrics_port})

    async def set_ready(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, SERVING)
        if self.options.ready_file:
            payload = {"port": self.port, "metrics_port": self.metrics_port}
            tmp = self.options.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload))
            tmp.rename(self.options.ready_file)
        log.info("serving", extra={"port": self.port, "metrics_port": self.metrics_port})

    async def wait_for_termination(self, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.shutdown(on_shutdown)

    async def shutdown(self, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        grace = self.settings.shutdown_grace_s
        log.info("shutting down", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if on_shutdown is not None:
            await on_shutdown()
        log.info("stopped")


async def serve_models(
    settings: Settings,
    options: ServerOptions,
    service_name: str,
    host: ModelHost,
    register: Callable[[grpc.aio.Server], None],
) -> None:
    """Serve a model-backed service: port up first (health NOT_SERVING), models loaded, then SERVING."""
    service = GrpcService(settings, options, [service_name])
    register(service.server)
    await service.start()
    try:
        await asyncio.to_thread(host.load_all)
    except BaseException:
        await service.server.stop(0)
        host.shutdown()
        raise
    await service.set_ready()

    async def stop_engines() -> None:
        await asyncio.to_thread(host.shutdown)

    await service.wait_for_termination(on_shutdown=stop_engines)
