"""The gRPC server bootstrap every service uses.

A `GrpcService` is started with its servicers registered; it then serves health (NOT_SERVING until the
service says it is ready), reflection, the shared interceptor (API key, error mapping, metrics), optional
TLS, and Prometheus metrics on an HTTP port. SIGTERM or SIGINT stops it gracefully, also while models
are still loading: health turns NOT_SERVING, new calls are refused, in-flight calls get a grace period,
then the service's own shutdown hook runs and the process exits 0.

An engine that dies (a bug, or a fatal device error such as a CUDA device-side assert) turns health
NOT_SERVING at once and the process exits 1, so compose or Kubernetes restarts it: a server that cannot
serve must never look healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.hosting import ModelHost, ModelHosts
from shared.interceptors import ServiceInterceptor
from shared.metrics import start_metrics_server
from shared.settings import Settings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerOptions:
    bind_address: str = "127.0.0.1"  # the interface the gRPC port listens on
    metrics_bind_address: str = "127.0.0.1"  # and the metrics port (no login: loopback unless a scraper needs it)
    port: int = 0
    metrics_port: int = -1
    ready_file: Path | None = None  # written with the bound ports once the service is ready
    max_message_bytes: int = 4 * 1024 * 1024  # per service: from its settings section
    max_concurrent_rpcs: int | None = None  # past it, new calls get RESOURCE_EXHAUSTED


class ExposedWithoutKey(SystemExit):
    """A server asked to listen beyond loopback with nothing guarding it: it refuses to start."""


def check_exposure(settings: Settings, bind_address: str) -> None:
    refusal = settings.exposure_refusal(bind_address)
    if refusal:
        log.error("refusing to start", extra={"reason": refusal})
        raise ExposedWithoutKey(f"error: {refusal}")
    if settings.allow_unauthenticated and not settings.keys_configured:
        log.warning(
            "serving WITHOUT an API key (allow_unauthenticated): anyone who reaches the port may use everything",
            extra={"bind": bind_address},
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return grpc.ssl_server_credentials([(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])


class GrpcService:
    """One gRPC server process: register servicers, `start`, `set_ready`, then `run_until_stopped`."""

    def __init__(self, settings: Settings, options: ServerOptions, service_names: list[str]):
        self.settings = settings
        self.options = options
        self.service_names = service_names
        check_exposure(settings, options.bind_address)
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(settings.key_ring())],
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.max_send_message_length", options.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # a GOAWAY after this age makes a client re-resolve the name it dialled; no grace limit, so
                # a long generation stream in flight is never cut
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.stop_requested = asyncio.Event()  # SIGTERM / SIGINT
        self.failure: str | None = None  # why the service can no longer serve
        self.failed = asyncio.Event()

    async def start(self) -> None:
        address = f"{self.options.bind_address}:{self.options.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"could not bind the gRPC port {address}")
        for name in ["", *self.service_names]:
            await self.health.set(name, NOT_SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # from here on, also while models load
            loop.add_signal_handler(sig, self.stop_requested.set)
        await self.server.start()
        self.metrics_port = start_metrics_server(self.options.metrics_port, self.options.metrics_bind_address)
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

    async def fail(self, reason: str) -> None:
        """The service can no longer serve: health NOT_SERVING at once, then `run_until_stopped` ends."""
        if self.failure is None:
            self.failure = reason
            log.error("service failed; health is NOT_SERVING and the process will exit", extra={"reason": reason})
            for name in ["", *self.service_names]:
                await self.health.set(name, NOT_SERVING)
        self.failed.set()

    async def run_until_stopped(self, on_shutdown: Callable[[], Awaitable[None]] | None = None) -> int:
        """Serve until SIGTERM/SIGINT (exit code 0) or `fail` (exit code 1), then shut down gracefully."""
        await _first_of(self.stop_requested.wait(), self.failed.wait())
        await self.shutdown(on_shutdown)
        return 1 if self.failure else 0

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
    models: ModelHost | ModelHosts,
    register: Callable[[grpc.aio.Server], None],
) -> int:
    """Serve a model-backed service: port up first (health NOT_SERVING), models loaded, then SERVING.

    Returns the process exit code: 0 after SIGTERM (during loading too), 1 when an engine died.
    """
    service = GrpcService(settings, options, [service_name])
    register(service.server)
    await service.start()
    loop = asyncio.get_running_loop()

    def engine_died(model: str, cause: BaseException) -> None:  # on the engine's thread
        reason = f"the engine of model {model!r} stopped: {type(cause).__name__}"
        with contextlib.suppress(RuntimeError):  # the loop is already closed: the process is exiting anyway
            asyncio.run_coroutine_threadsafe(service.fail(reason), loop)

    models.on_engine_death = engine_died
    loading = _in_daemon_thread(models.load_all, "model-loader")
    try:
        await _first_of(asyncio.shield(loading), service.stop_requested.wait())
    except BaseException:
        await service.server.stop(0)
        models.shutdown()
        raise
    if not loading.done():  # stopped while loading: the loader thread is abandoned (it is a daemon)
        log.info("stopped while loading models")
        await service.server.stop(0)
        await asyncio.to_thread(models.shutdown)
        log.info("stopped")
        return 0
    if service.failure is None:
        await service.set_ready()

    async def stop_engines() -> None:
        await asyncio.to_thread(models.shutdown)

    return await service.run_until_stopped(on_shutdown=stop_engines)


async def _first_of(*awaitables: Awaitable) -> None:
    """Wait until one of `awaitables` finishes (raising its error, if any); cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    for task in done:
        task.result()


def _in_daemon_thread(fn: Callable[[], object], name: str) -> asyncio.Future:
    """Run `fn` on a daemon thread: unlike `asyncio.to_thread`, it cannot hold the process open at exit,
    so a SIGTERM during a long model load ends the process promptly."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            callback = (settle, None, exc)
        else:
            callback = (settle, result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for this any more
            loop.call_soon_threadsafe(*callback)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
