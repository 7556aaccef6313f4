"""Fuzzing every request field of the LLM and diffusion services through real channels (see tests/fuzzing.py).

A bounded, derandomized example count runs here (`MODELWORKS_FUZZ_EXAMPLES`, default 30 per RPC);
`make bench` runs a larger random one.
"""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import start_server, stop_server
from tests.fuzzing import FUZZ_SERVER_ENV, fuzz, fuzz_targets

EXAMPLES = int(os.environ.get("MODELWORKS_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module", params=["llm", "diffusion"])
def fuzzed_server(request, data_dir, adapters, diffusion_adapters, tmp_path_factory):
    server = start_server(request.param, data_dir, tmp_path_factory.mktemp(f"fuzz-{request.param}"), FUZZ_SERVER_ENV)
    yield request.param, server
    stop_server(server)


def test_no_request_gets_internal_or_hangs_and_the_server_stays_healthy(fuzzed_server):
    kind, server = fuzzed_server
    with grpc.insecure_channel(server.address) as channel:
        targets = fuzz_targets(channel if kind == "llm" else None, channel if kind == "diffusion" else None)
        for target in targets:
            report = fuzz(target, EXAMPLES, derandomize=True)
            if target.request_class.DESCRIPTOR.fields:  # an empty message has one example only
                assert report.examples >= min(EXAMPLES, 10), (target.name, report)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.process.poll() is None
