"""Container health check: exit 0 only if the gRPC server reports SERVING (or the HTTP URL answers 200).

    python docker/healthcheck.py [TARGET] [SERVICE]
    python docker/healthcheck.py http://127.0.0.1:7860/

TARGET defaults to 127.0.0.1:50051; SERVICE defaults to "" (the server as a whole). Each call times out
after 3 s. Health is exempt from the API key. When MODELWORKS_TLS_CERT_FILE is set the check uses TLS,
trusting MODELWORKS_HEALTHCHECK_CA_FILE (default: the server's own certificate, right for a self-signed
one) and, if set, checking the certificate against MODELWORKS_HEALTHCHECK_TLS_NAME instead of the host.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TIMEOUT_S = 3.0


def open_channel(target: str) -> grpc.Channel:
    options: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0)]
    cert_file = os.environ.get("MODELWORKS_TLS_CERT_FILE")
    if not cert_file:
        return grpc.insecure_channel(target, options=options)
    ca_file = os.environ.get("MODELWORKS_HEALTHCHECK_CA_FILE") or cert_file
    with open(ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    name = os.environ.get("MODELWORKS_HEALTHCHECK_TLS_NAME")
    if name:
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target, credentials, options=options)


def check_http(url: str) -> int:
    """For the web app, the OpenAI API and the worker (whose metrics server lives in its process): 200 is alive."""
    try:
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the check is local
        with no_proxy.open(url, timeout=TIMEOUT_S) as reply:
            status = reply.status
    except (urllib.error.URLError, OSError) as error:
        print(f"{url}: unhealthy: {error}", file=sys.stderr)
        return 1
    print(f"{url}: HTTP {status}")
    return 0 if status == 200 else 1


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else DEFAULT_TARGET
    if target.startswith(("http://", "https://")):
        return check_http(target)
    service = argv[2] if len(argv) > 2 else ""
    try:
        with open_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        print(f"{target}: unhealthy: {error.code().name}: {error.details() or 'no details'}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable CA file
        print(f"{target}: health check failed: {error}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
