"""A server whose engine dies says so: health turns NOT_SERVING, requests get UNAVAILABLE, the process exits 1.

The LLM service runs in this process (its real `serve`, real gRPC server and channel) so that a fatal
device error can be injected into the model's forward: there is no GPU here to fault for real.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import LlamaForCausalLM

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from shared.serving import ServerOptions
from shared.settings import Settings
from tests.conftest import TEST_MODELS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_for_file(path, timeout=120):
    for _ in range(int(timeout / 0.05)):
        if path.exists():
            return json.loads(path.read_text())
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{path} never appeared")


def test_a_fatal_device_error_turns_health_not_serving_and_the_server_exits_1(monkeypatch, data_dir, tmp_path):
    from services.llm.app import serve

    settings = Settings.model_validate({"data_dir": data_dir, "models": TEST_MODELS[:1], "shutdown_grace_s": 2})
    ready = tmp_path / "ready.json"
    options = ServerOptions(bind_address="127.0.0.1", port=0, metrics_port=-1, ready_file=ready)

    def device_fault(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    async def main() -> tuple[int, grpc.StatusCode, str, list[int]]:
        server = asyncio.create_task(serve(settings, options))
        port = (await wait_for_file(ready))["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            statuses = [(await watch.read()).status]
            monkeypatch.setattr(LlamaForCausalLM, "forward", device_fault)  # every forward from now on
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await llm_pb2_grpc.LLMServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="x"))
            statuses.append((await watch.read()).status)
            watch.cancel()
        exit_code = await asyncio.wait_for(server, 60)
        return exit_code, caught.value.code(), caught.value.details(), statuses

    exit_code, code, details, statuses = asyncio.run(main())
    assert code == grpc.StatusCode.UNAVAILABLE and "restarting" in details
    assert statuses == [SERVING, NOT_SERVING]
    assert exit_code == 1
