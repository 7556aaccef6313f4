"""Quantized bases on this CPU, side by side in one run (the point on a CPU is memory, not speed):

(q1) SmolLM2-135M-Instruct served as bf16, NF4 and int8 (one LLM server holding the three): the weight
     bytes ListModels reports, and aggregate tokens/s of 16 concurrent chat streams, each against bf16;
(q2) peak training memory of the same LoRA job on SmolLM2 (rank 16, batch 4, 4 steps, float32 compute as on
     any CPU): plain, with gradient checkpointing, as QLoRA (NF4 base), and QLoRA with checkpointing; each
     a fresh process, its peak resident memory over what it held before loading the model, and the
     frozen base's weight bytes, against the plain job.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from pathlib import Path

import grpc

from bench.realmodel import MODEL, QUESTIONS
from bench.report import Row
from tests.harness import spawn_service

NEW_TOKENS = 32
ROUNDS = 2
SERVED = {"bf16": ("bfloat16", "none"), "nf4": ("float32", "bnb-nf4"), "int8": ("float32", "bnb-int8")}
JOBS = {
    "LoRA": {},
    "LoRA + checkpointing": {"gradient_checkpointing": True},
    "QLoRA (NF4)": {"quantization": "bnb-nf4"},
    "QLoRA + checkpointing": {"quantization": "bnb-nf4", "gradient_checkpointing": True},
}
MiB = 2**20


def _entries() -> list[dict]:
    return [
        {**MODEL, "name": f"smollm2-{label}", "dtype": dtype, "quantization": quantization}
        for label, (dtype, quantization) in SERVED.items()
    ]


def _streams(address: str, model: str) -> float:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    sampling = llm_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [
        llm_pb2.GenerateRequest(model=model, messages=[llm_pb2.ChatMessage(role="user", content=q)], sampling=sampling)
        for q in QUESTIONS
    ]

    async def main() -> float:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            start = time.perf_counter()
            replies = await asyncio.gather(*(stub.Generate(r) for r in requests))
            return sum(r.usage.completion_tokens for r in replies) / (time.perf_counter() - start)

    return asyncio.run(main())


def _serving_rows(workdir: Path, settings_config: dict) -> list[Row]:
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    server = spawn_service("llm", workdir / "quantization-llm", settings_config, timeout=300)
    try:
        with grpc.insecure_channel(server.address) as channel:
            infos = {
                m.name: m for m in llm_pb2_grpc.LLMServiceStub(channel).ListModels(llm_pb2.ListModelsRequest()).models
            }
        names = [f"smollm2-{label}" for label in SERVED]
        for name in names:
            _streams(server.address, name)  # warm-up
        speeds = {name: [] for name in names}
        for _ in range(ROUNDS):
            for name in names:
                speeds[name].append(_streams(server.address, name))
    finally:
        server.stop()
    bf16 = infos["smollm2-bf16"]
    rows = []
    for name in names[1:]:
        rows.append(
            Row(
                name,
                "(q1) weight bytes",
                f"{infos[name].weight_bytes / MiB:.1f} MiB",
                f"{bf16.weight_bytes / MiB:.1f} MiB (bf16)",
                infos[name].weight_bytes / bf16.weight_bytes,
            )
        )
        rows.append(
            Row.of_pairs(
                name,
                "(q1) tokens/s, 16 streams",
                list(zip(speeds[name], speeds["smollm2-bf16"], strict=True)),
                ",.1f",
                "bf16",
            )
        )
    return rows


def _train(config: dict, hyperparameters: dict, job_dir: str, queue) -> None:
    """In a fresh process: one LoRA job's setup and 4 steps; puts (base bytes, peak MiB over the start)."""
    import torch

    from bench.finetune import sample_training_data
    from services.finetune.hyperparams import Hyperparameters, resolve
    from services.finetune.samples import llm_sample_jsonl
    from services.finetune.training.recipe import RecipeContext, load_recipe
    from shared.quantization import weight_bytes
    from shared.settings import Settings

    settings = Settings.model_validate(config)
    dataset = Path(job_dir) / "data.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_bytes(llm_sample_jsonl())
    data = sample_training_data(context_length=8192)
    hp, total = resolve(
        Hyperparameters(max_steps=4, batch_size=4, mixed_precision="no", validation_fraction=0, **hyperparameters),
        data,
    )
    context = RecipeContext(
        "bench", settings.models[0], dataset, hp, total, settings, torch.device("cpu"), Path(job_dir), None
    )
    recipe = load_recipe("llm")(context)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    recipe.setup()
    base = recipe.model.get_base_model()
    frozen = weight_bytes(base) - sum(p.nbytes for p in base.parameters() if p.requires_grad)
    recipe.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((frozen, (peak - before) / MiB))


def _training_rows(workdir: Path, config: dict) -> list[Row]:
    spawn = multiprocessing.get_context("spawn")
    figures = {}
    train_config = {**config, "models": [{**MODEL, "dtype": "float32"}]}
    for label, hyperparameters in JOBS.items():
        queue = spawn.Queue()
        child = spawn.Process(
            target=_train, args=(train_config, hyperparameters, str(workdir / "quantization-jobs" / label), queue)
        )
        child.start()
        figures[label] = queue.get(timeout=1800)
        child.join()
    plain_base, plain_peak = figures["LoRA"]
    bf16_base = plain_base / 2
    rows = [Row("smollm2 LoRA", "(q2) training peak", f"{plain_peak:.0f} MiB", "-", None)]
    for label, (base, peak) in list(figures.items())[1:]:
        rows.append(
            Row(
                f"smollm2 {label}",
                "(q2) training peak",
                f"{peak:.0f} MiB",
                f"{plain_peak:.0f} MiB (LoRA)",
                peak / plain_peak,
            )
        )
        if base < plain_base:
            rows.append(
                Row(
                    f"smollm2 {label}",
                    "(q2) frozen base weights",
                    f"{base / MiB:.1f} MiB",
                    f"{bf16_base / MiB:.1f} MiB (bf16)",
                    base / bf16_base,
                )
            )
    return rows


def run(workdir: Path) -> list[Row]:
    from shared.loaders import prepare
    from shared.settings import Settings

    config = {"data_dir": str(workdir), "models": _entries(), "log_level": "WARNING"}
    settings = Settings.model_validate(config)
    prepare(settings.models[0], settings)  # converted once, before anything is measured
    return _serving_rows(workdir, config) + _training_rows(workdir, config)


NOTE = (
    f"(q1): medians of {ROUNDS} rounds of {len(QUESTIONS)} chat requests x {NEW_TOKENS} tokens per model, the models"
    " taking turns; NF4 and int8 compute in float32 (this CPU has no native bf16), bf16 is emulated here. SmolLM2's"
    " tied 49k x 576 embedding stays unquantized, a fifth of its parameters. (q2): ru_maxrss of each job's process"
    " over its value before loading; plain LoRA holds its frozen base in float32 on a CPU, as the recipe loads it,"
    " and the base-weights ratio is against that base in bf16 (half its float32 bytes: every weight is a float)."
)
