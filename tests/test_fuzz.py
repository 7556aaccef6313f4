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


@pytest.fixture(scope="module", params=["llm", "diffusion", "diffusion-families"])
def fuzzed_server(request, data_dir, adapters, diffusion_adapters, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    if request.param == "diffusion-families":  # SDXL, SD3 and Flux: their schedulers, guidance and sizes
        server = _families_server(data_dir, workdir)
    else:
        server = start_server(request.param, data_dir, workdir, FUZZ_SERVER_ENV)
    yield request.param.split("-")[0], server
    stop_server(server)


def _families_server(data_dir, workdir):
    from shared.builtin import ensure_builtin
    from tests.conftest import TEST_SERVER_CONFIG
    from tests.diffusion.test_families import ENTRIES
    from tests.harness import spawn_service

    for entry in ENTRIES:
        ensure_builtin(entry["source"].removeprefix("builtin:"), data_dir / "models")
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "models": ENTRIES}
    return spawn_service("diffusion", workdir, config, FUZZ_SERVER_ENV, timeout=300)


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
