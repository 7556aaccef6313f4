"""Queue limits and graceful shutdown, on a dedicated server with a one-slot batch and a one-slot queue."""

from __future__ import annotations

import grpc
import pytest

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from shared.launch import wait_for
from tests.conftest import start_server, stop_server
from tests.scrape import metric_value

LONG = llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(max_new_tokens=1000, ignore_eos=True))


@pytest.fixture(scope="module")
def tight_server(data_dir, tmp_path_factory):
    env = {"MODELWORKS_LLM__MAX_BATCH_SIZE": "1", "MODELWORKS_LLM__MAX_WAITING_REQUESTS": "1"}
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
        wait_for(
            lambda: metric_value(tight_server, "modelworks_llm_num_requests_running", model="tiny-llm") == 0,
            30,
            "the server to be idle",
        )
        stream = stub.GenerateStream(request)
        chunks = [next(stream)]
        tight_server.process.terminate()  # SIGTERM
        chunks.extend(stream)
        assert chunks[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 300
    assert stop_server(tight_server) == 0
    assert '"msg": "stopped"' in tight_server.logs()
