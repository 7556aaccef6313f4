"""`modelworks status`: whether every service answers its gRPC health check with SERVING."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelworks_cli.connection import describe
from modelworks_cli.options import command_options
from modelworks_cli.output import print_json, print_table

SERVICES = ("llm", "diffusion", "finetune")


def register(commands) -> None:
    status = commands.add_parser(
        "status", parents=[command_options()], help="health of the LLM, diffusion and fine-tune services"
    )
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each service (default 5)")
    status.set_defaults(run=show_status)


def check(clients, service: str, timeout: float) -> str:
    """The service's overall health (`SERVING`, `NOT_SERVING`, ...), or `UNREACHABLE`."""
    stub = health_pb2_grpc.HealthStub(clients.channel(service))
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as error:
        return (
            "UNREACHABLE"
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            else (error.code().name)
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def show_status(args, clients) -> int:
    states = {service: check(clients, service, args.timeout) for service in SERVICES}
    if args.json:
        print_json([{"service": s, "target": clients.targets[s], "status": states[s]} for s in SERVICES])
    else:
        print_table(["SERVICE", "TARGET", "STATUS"], [(s, clients.targets[s], states[s]) for s in SERVICES])
    failing = [s for s in SERVICES if states[s] != "SERVING"]
    for service in failing:
        print(f"modelworks: {describe(service, clients.targets[service])} is {states[service]}", file=sys.stderr)
    return 1 if failing else 0
