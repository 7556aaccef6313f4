"""The web app's cost on top of the LLM service, side by side on the default chat model (SmolLM2-135M):

  (g1) time to the first streamed text of a chat through the gateway (`gradio_client`, HTTP + SSE), over
       the same request straight to the LLM service over gRPC;
  (g2) wall time of the whole 32-token reply, the same two ways;
  (g3) 8 people chatting at once through the gateway (one `gradio_client` session each), aggregate
       tokens/s over the same 8 streams straight to the service.
Greedy, EOS ignored, so every reply has the same length; the pairs alternate, one after the other.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.realmodel import MODEL
from bench.report import Row
from tests.harness import free_port, spawn_gateway, spawn_service

NOTE = (
    "gateway: `python -m services.gateway` in front of the LLM service, called with `gradio_client`; "
    "direct: the same request over gRPC. 32 new tokens, greedy, EOS ignored; ratios are medians of "
    "per-pair ratios (lower is better for times, higher for tokens/s)."
)
NEW_TOKENS = 32
PAIRS = 8
CONCURRENT = 8
QUESTION = "What is the capital of France?"


def _direct(stub, llm_pb2) -> tuple[float, float]:
    """(seconds to the first text, seconds to the end) of one streamed chat straight to the service."""
    request = llm_pb2.GenerateRequest(
        model=MODEL["name"],
        messages=[llm_pb2.ChatMessage(role="user", content=QUESTION)],
        sampling=llm_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
    )
    started, first = time.perf_counter(), None
    for chunk in stub.GenerateStream(request):
        if first is None and chunk.text:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def _through_gateway(client) -> tuple[float, float]:
    """The same through the gateway, in a new chat session of `client` (a `gradio_client.Client`, made
    beforehand: connecting reads the app's config, a cost a chat page pays once)."""
    client.reset_session()  # a fresh conversation, so every reply has the same prompt
    started = time.perf_counter()
    job = client.submit(
        QUESTION, "", MODEL["name"], "(base model)", NEW_TOKENS, 0, 1, 0, 1, "", 1, True, api_name="/chat"
    )  # fmt: skip
    first = None
    for output in job:
        if first is None and output[0]:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def _aggregate(one, n: int) -> float:
    """Tokens/s of `n` replies made at once by `one(i)`, i in range(n)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return n * NEW_TOKENS / (time.perf_counter() - started)


def run(workdir: Path) -> list[Row]:
    from gradio_client import Client

    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
    from shared.loaders import prepare
    from shared.settings import Settings

    config = {"data_dir": str(workdir), "models": [MODEL], "log_level": "WARNING"}
    prepare(Settings.model_validate(config).models[0], Settings.model_validate(config))
    server = spawn_service("llm", workdir / "gateway-llm", config)
    nowhere = f"127.0.0.1:{free_port()}"
    gateway = spawn_gateway(
        workdir / "gateway",
        {
            "MODELWORKS_LLM_TARGET": server.address,
            "MODELWORKS_DIFFUSION_TARGET": nowhere,
            "MODELWORKS_FINETUNE_TARGET": nowhere,
            "MODELWORKS_GATEWAY_CONCURRENCY_LIMIT": str(CONCURRENT),
        },
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            clients = [Client(gateway.address, verbose=False) for _ in range(CONCURRENT)]
            _direct(stub, llm_pb2), _through_gateway(clients[0])  # warm-up
            singles = [(_through_gateway(clients[0]), _direct(stub, llm_pb2)) for _ in range(PAIRS)]
            bursts = [
                (
                    _aggregate(lambda i: _through_gateway(clients[i]), CONCURRENT),
                    _aggregate(lambda i: _direct(stub, llm_pb2), CONCURRENT),
                )
                for _ in range(3)
            ]
    finally:
        gateway.stop()
        server.stop()
    name = MODEL["name"]
    ms = 1000
    return [
        Row.of_pairs(
            name,
            "(g1) time to first text, ms",
            [(g[0] * ms, d[0] * ms) for g, d in singles],
            ".0f",
            "direct gRPC",
        ),
        Row.of_pairs(
            name,
            f"(g2) {NEW_TOKENS}-token reply, ms",
            [(g[1] * ms, d[1] * ms) for g, d in singles],
            ".0f",
            "direct gRPC",
        ),
        Row.of_pairs(name, f"(g3) tokens/s, {CONCURRENT} chats at once", bursts, ",.1f", "direct gRPC"),
    ]
