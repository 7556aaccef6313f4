"""When the local stack may say "ready": every gRPC service reports SERVING through gRPC health, the worker
has registered in Redis, and the web app and the OpenAI API answer HTTP. Each check is a plain function
that is true once its process serves; the waiter polls them all, never sleeping longer than a poll."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable

Check = Callable[[], bool]
POLL_S = 0.5


def grpc_serving(address: str, tls: bool) -> Check:
    """SERVING on the standard health service; where the service speaks TLS only that it accepts connections
    (its certificate need not name the loopback address the stack checks from)."""

    def check() -> bool:
        if tls:
            return port_open(address)
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return check


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def http_answers(url: str) -> Check:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.status < 500
        except OSError:
            return False

    return check


def worker_registered(redis_url: str) -> Check:
    def check() -> bool:
        import redis

        try:
            client = redis.Redis.from_url(redis_url, socket_timeout=2)
            return next(iter(client.scan_iter(match="modelworks:worker:*", count=100)), None) is not None
        except redis.RedisError:
            return False

    return check


def wait_until_ready(
    checks: dict[str, Check],
    keep_waiting: Callable[[], bool],
    report: Callable[[list[str], float], None],
    report_every_s: float = 15.0,
) -> bool:
    """Poll `checks` until all pass (True), or until `keep_waiting()` turns false (False: a process died or
    the user stopped). `report(pending, waited_s)` is called every `report_every_s` while some are pending."""
    pending = list(checks)
    start = last_report = time.monotonic()
    while pending:
        if not keep_waiting():
            return False
        pending = [name for name in pending if not checks[name]()]
        now = time.monotonic()
        if pending and now - last_report >= report_every_s:
            report(pending, now - start)
            last_report = now
        if pending:
            time.sleep(POLL_S)
    return True
