"""Robustness under load and under fuzzing, on the tiny models.

(f) fuzz: a larger, random run of the property test in `tests/fuzzing.py` against both services (every
    request field; no INTERNAL, no hang, healthy after), with the example count and status mix reported;
(g) load: 64 concurrent streams for a fixed number of requests, a quarter cancelled by the client after
    their first token, a quarter with a deadline that passes mid-generation; unexpected errors are
    counted (anything but OK, the client's own CANCELLED and DEADLINE_EXCEEDED), and the server's RSS
    is read before and after two identical rounds: the second round's growth is the leak figure
    (the first warms allocators and caches).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from bench.report import Row
from tests.fuzzing import FUZZ_SERVER_ENV, fuzz, fuzz_targets
from tests.harness import spawn_service

FUZZ_EXAMPLES = 400  # per RPC
STREAMS = 64
REQUESTS = 512
NEW_TOKENS = 48
MODELS = [
    {"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm"},
    {"name": "tiny-sd", "kind": "diffusion", "source": "builtin:tiny-sd", "diffusion": {"steps": 4}},
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def load_round(address: str) -> dict[str, int]:
    """REQUESTS streams, STREAMS in flight: every 4th cancelled after its first chunk, every 4th (offset 1)
    with a deadline too short to finish; returns outcome counts."""
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    async def main() -> dict[str, int]:
        outcomes: dict[str, int] = {}
        gate = asyncio.Semaphore(STREAMS)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)

            async def one(i: int) -> None:
                kind = ("cancel", "deadline", "complete", "complete")[i % 4]
                tokens = NEW_TOKENS if kind != "deadline" else 100_000
                request = llm_pb2.GenerateRequest(
                    prompt=f"def f{i}(x):", sampling=llm_pb2.SamplingParams(max_new_tokens=tokens, ignore_eos=True)
                )
                async with gate:
                    call = stub.GenerateStream(request, timeout=0.5 if kind == "deadline" else 300)
                    try:
                        async for _ in call:
                            if kind == "cancel":
                                call.cancel()
                                break
                        outcome = f"{kind}: OK" if kind != "cancel" else "cancel: CANCELLED"
                    except grpc.aio.AioRpcError as error:
                        outcome = f"{kind}: {error.code().name}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

            await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        return outcomes

    return asyncio.run(main())


EXPECTED = {"complete: OK", "cancel: CANCELLED", "deadline: DEADLINE_EXCEEDED"}


def run(workdir: Path) -> list[Row]:
    config = {"data_dir": str(workdir), "models": MODELS, "log_level": "WARNING"}
    return fuzz_rows(workdir, config) + load_rows(workdir, config)


def fuzz_rows(workdir: Path, config: dict) -> list[Row]:
    rows = []
    llm = spawn_service("llm", workdir / "fuzz-llm", config, FUZZ_SERVER_ENV)
    diffusion = spawn_service("diffusion", workdir / "fuzz-diffusion", config, FUZZ_SERVER_ENV)
    try:
        with grpc.insecure_channel(llm.address) as llm_channel, grpc.insecure_channel(diffusion.address) as d_channel:
            for target in fuzz_targets(llm_channel, d_channel):
                if not target.request_class.DESCRIPTOR.fields:
                    continue
                report = fuzz(target, FUZZ_EXAMPLES, derandomize=False)
                mix = ", ".join(f"{code} {n}" for code, n in sorted(report.by_code.items()))
                rows.append(Row("fuzz", f"(f) {target.name} ({mix})", f"{report.examples} examples", "-", None))
            healthy = all(_serving(channel) for channel in (llm_channel, d_channel))
        alive = llm.process.poll() is None and diffusion.process.poll() is None
        rows.append(Row("fuzz", "(f) both servers alive and SERVING after", str(alive and healthy), "-", None))
    finally:
        llm.stop()
        diffusion.stop()
    return rows


def load_rows(workdir: Path, config: dict) -> list[Row]:
    limits = {"max_new_tokens_limit": 131072, "max_batch_size": STREAMS, "max_waiting_requests": 2 * REQUESTS}
    server = spawn_service("llm", workdir / "load-llm", config | {"llm": limits})
    try:
        load_round(server.address)  # warm-up: allocator arenas, the KV cache's largest shapes
        before = rss_mib(server.process.pid)
        first = load_round(server.address)
        middle = rss_mib(server.process.pid)
        second = load_round(server.address)
        after = rss_mib(server.process.pid)
    finally:
        server.stop()
    rows = []
    for label, outcomes in (("round 1", first), ("round 2", second)):
        unexpected = sum(n for outcome, n in outcomes.items() if outcome not in EXPECTED)
        mix = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        rows.append(Row("tiny-llm", f"(g) {STREAMS} streams, {label} ({mix})", f"{unexpected} unexpected", "-", None))
    rows.append(
        Row(
            "tiny-llm",
            "(g) server RSS after round 1 / round 2, MiB",
            f"{middle:.0f} / {after:.0f}",
            f"{before:.0f} (after warm-up)",
            after / middle,
        )
    )
    return rows


def _serving(channel: grpc.Channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


NOTE = (
    f"(f) {FUZZ_EXAMPLES} random examples per RPC (the tests run a derandomized 30); every answer must be a status"
    f" a client can act on. (g) {REQUESTS} requests per round; the RSS ratio is round 2 over round 1 (1.00 = flat)."
)
