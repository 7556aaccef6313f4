"""Prometheus metrics shared by every gRPC service, and the HTTP endpoint that exposes them."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "modelworks_grpc_requests",
    "gRPC requests handled, by service, method, status code and API key name",
    ["service", "method", "code", "key"],
)
RPC_LATENCY = Histogram(
    "modelworks_grpc_request_duration_seconds",
    "gRPC request handling time, by service and method",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics over HTTP on `port` (0 picks a free one; negative disables). Returns the bound port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]
