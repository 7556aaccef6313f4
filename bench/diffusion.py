"""Diffusion serving benchmark, on the built-in tiny-sd, measured side by side in one run:

(a) one request through gRPC vs the same pipeline call in process (median);
(b) images/s of 4 concurrent requests vs the same 4 requests one at a time, both through the service.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from bench.report import Row
from shared.loaders import load_diffusion_pipeline
from shared.settings import Settings
from tests.harness import spawn_service

MODEL = {"name": "tiny-sd", "kind": "diffusion", "source": "builtin:tiny-sd"}
STEPS = 20
GUIDANCE = 7.5
ROUNDS = 5
PROMPTS = ["a lighthouse at dusk", "a bowl of ramen", "a fox in the snow", "a city street in the rain"]


def _request(pb2, prompt: str, seed: int):
    return pb2.GenerateImagesRequest(prompt=prompt, steps=STEPS, guidance_scale=GUIDANCE, seed=seed, scheduler="DDIM")


def run(workdir: Path) -> list[Row]:
    from diffusers import DDIMScheduler

    from modelworks.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

    config = {"data_dir": str(workdir), "models": [MODEL], "log_level": "WARNING"}
    settings = Settings.model_validate(config)
    pipe = load_diffusion_pipeline(settings.models[0], settings).pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    server = spawn_service("diffusion", workdir / "diffusion-server", config)

    def in_process(prompts: list[str], seeds: list[int]) -> float:
        """Seconds for one call of the bare pipeline with these prompts."""
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompts,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            )
        return time.perf_counter() - start

    single: list[tuple[float, float]] = []
    concurrent: list[tuple[float, float]] = []
    ceiling: list[tuple[float, float]] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)

            def call(i: int) -> None:
                stub.GenerateImages(_request(diffusion_pb2, PROMPTS[i], seed=i))

            call(0)  # warm-ups
            in_process(PROMPTS[:1], [0])
            for _ in range(ROUNDS):
                for i in range(2):
                    start = time.perf_counter()
                    call(i)
                    single.append((time.perf_counter() - start, in_process(PROMPTS[i : i + 1], [i])))
                start = time.perf_counter()
                for i in range(len(PROMPTS)):
                    call(i)
                one_at_a_time = len(PROMPTS) / (time.perf_counter() - start)
                start = time.perf_counter()
                with ThreadPoolExecutor(len(PROMPTS)) as pool:
                    list(pool.map(call, range(len(PROMPTS))))
                concurrent.append((len(PROMPTS) / (time.perf_counter() - start), one_at_a_time))
                # the same pipeline called in process with all 4 prompts at once vs 4 single calls: what
                # batching itself can gain on this machine, the ceiling for (b)
                singles = sum(in_process([p], [i]) for i, p in enumerate(PROMPTS))
                batched = in_process(PROMPTS, list(range(len(PROMPTS))))
                ceiling.append((len(PROMPTS) / batched, len(PROMPTS) / singles))
    finally:
        server.stop()
    name = MODEL["name"]
    return [
        Row.of_pairs(name, f"(a) one request ({STEPS} steps, CFG), s", single, ".3f", "same call in process"),
        Row.of_pairs(name, "(b) images/s, 4 concurrent requests", concurrent, ".2f", "the 4 one at a time"),
        Row.of_pairs(name, "(c) images/s, in process: 1 call of 4 prompts", ceiling, ".2f", "4 calls of 1"),
    ]


NOTE = (
    f"Medians of {ROUNDS} rounds, each ratio the median of per-round ratios. (a) gRPC time over in-process"
    " time, 1.00 = no overhead; (b) concurrent over one-at-a-time throughput, higher is better; (c) the"
    " same for the bare pipeline in process: the most batching can give on this machine, the ceiling for (b)."
)
