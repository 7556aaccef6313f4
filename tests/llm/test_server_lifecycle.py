"""Queue limits and graceful shutdown: on a server with a one-slot batch and queue, and during model loading."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from tests.conftest import HELD_TOKENS, TEST_SERVER_CONFIG, start_server, stop_server
from tests.harness import REPO_ROOT, wait_for
from tests.scrape import metric_value

LONG = llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(max_new_tokens=HELD_TOKENS, ignore_eos=True))


@pytest.fixture(scope="module")
def tight_server(data_dir, tmp_path_factory):
    env = {
        "MODELWORKS_LLM__MAX_BATCH_SIZE": "1",
        "MODELWORKS_LLM__MAX_WAITING_REQUESTS": "1",
        "MODELWORKS_SHUTDOWN_GRACE_S": "120",  # the in-flight stream below must finish, however busy the machine
    }
    server = start_server("llm", data_dir, tmp_path_factory.mktemp("tight"), env)
    yield server
    stop_server(server)


def test_a_full_queue_gives_resource_exhausted(tight_server):
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        running = stub.GenerateStream(LONG)
        next(running)
        waiting = stub.GenerateStream(LONG)
        wait_for(
            lambda: metric_value(tight_server, "modelworks_llm_num_requests_waiting", model="tiny-llm") == 1,
            30,
            "the second request to queue",
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(LONG)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in caught.value.details() and "retry" in caught.value.details()
        running.cancel()
        waiting.cancel()


def test_sigterm_finishes_in_flight_streams_then_exits_cleanly(tight_server):
    request = llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(max_new_tokens=300, ignore_eos=True))
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        # idle: nothing running and nothing queued (the previous test's cancelled requests are gone; one
        # admitted between the two gauges' updates would take the one-request batch)
        gauges = ("modelworks_llm_num_requests_running", "modelworks_llm_num_requests_waiting")
        wait_for(
            lambda: all(metric_value(tight_server, gauge, model="tiny-llm") == 0 for gauge in gauges),
            30,
            "the server to be idle",
        )
        stream = stub.GenerateStream(request)
        chunks = [next(stream)]
        tight_server.process.terminate()  # SIGTERM
        chunks.extend(stream)
        logs = tight_server.logs()[-3000:]
        assert chunks[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH, logs
        assert chunks[-1].usage.completion_tokens == 300, logs
    assert stop_server(tight_server) == 0, tight_server.logs()[-3000:]
    assert '"msg": "stopped"' in tight_server.logs()


def test_sigterm_while_models_load_exits_cleanly_at_once(tmp_path):
    """Loading is held by construction: the test holds the lock that building the built-in model takes."""
    models = tmp_path / "data" / "models" / "builtin"
    models.mkdir(parents=True)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({**TEST_SERVER_CONFIG, "data_dir": str(tmp_path / "data")}))
    log = tmp_path / "llm.log"
    with (models / ".tiny-llm.lock").open("a") as lock, log.open("wb") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen(
            [sys.executable, "-m", "services.llm", "--bind", "127.0.0.1", "--port", "0", "--metrics-port", "-1"],
            cwd=REPO_ROOT,
            env={**os.environ, "MODELWORKS_CONFIG": str(config)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: '"grpc server started"' in log.read_text(), 120, "the gRPC port to open")
            port = next(json.loads(line)["port"] for line in log.read_text().splitlines() if "server started" in line)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            process.terminate()
            assert process.wait(60) == 0
        finally:
            process.kill()
            process.wait()
    assert '"stopped while loading models"' in log.read_text()
