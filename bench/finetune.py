"""Fine-tuning benchmark: a job through the queue against the same recipe called in process, side by side.

  (h) a job's wall time from CreateJob to SUCCEEDED (queue, claim, lease, progress events, checkpoints,
      the adapter written into the store) over the same training run in process (`train_here`: setup,
      train, save), on tiny-llm and on the ~100M-parameter llm-100m; both as steps/s;
  (i) CreateJob to RUNNING with an idle worker (as a client watching the job sees it);
  (j) SUCCEEDED to the first generated token with the new adapter, over the base model's first token.
Real processes: a redis-server, the fine-tune API, one worker and the LLM service.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import grpc
import torch

from bench.report import Row, percentile
from tests.harness import spawn_service, spawn_worker, start_redis

ROUNDS = 3
MODELS = [
    {"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm"},
    {"name": "llm-100m", "kind": "llm", "source": "builtin:llm-100m"},
]
STEPS = {"tiny-llm": 200, "llm-100m": 20}
QUESTION = "Question: Who keeps the Zephyr lighthouse?\nAnswer:"


def _job(pb, model: str, name: str, steps: int):
    return pb.CreateJobRequest(
        kind=pb.JOB_KIND_LLM,
        base_model=model,
        dataset_id="sample-llm-lighthouse",
        adapter_name=name,
        hyperparameters=pb.Hyperparameters(max_steps=steps, learning_rate=5e-3, save_steps=100, validation_fraction=0),
    )


def sample_training_data(context_length: int):
    """What CreateJob would find out about the bundled lighthouse sample on a Llama-shaped base."""
    from services.finetune.hyperparams import LLM_TARGETS, TrainingData

    return TrainingData(
        kind="llm", num_records=40, architecture="llama", context_length=context_length,
        record_type="prompt_completion", targets=LLM_TARGETS["llama"],
    )  # fmt: skip


def _in_process(settings, model: str, steps: int, job_dir: Path) -> float:
    from services.finetune.hyperparams import Hyperparameters, resolve
    from services.finetune.samples import llm_sample_jsonl
    from services.finetune.training.launch import TrainingSpec, train_here

    dataset = job_dir.parent / "inprocess.jsonl"
    dataset.write_bytes(llm_sample_jsonl())
    data = sample_training_data(context_length=2048)
    hp, total = resolve(
        Hyperparameters(max_steps=steps, learning_rate=5e-3, save_steps=100, validation_fraction=0), data
    )
    entry = next(m for m in settings.models if m.name == model)
    spec = TrainingSpec("bench", "llm", entry, dataset, hp, total, job_dir)
    start = time.perf_counter()
    train_here(spec, settings, None, job_dir / "adapter", torch.device("cpu"))
    return time.perf_counter() - start


def run(workdir: Path) -> list[Row]:
    from modelworks.finetune.v1 import finetune_pb2 as pb
    from modelworks.finetune.v1 import finetune_pb2_grpc
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
    from shared.loaders import load_causal_lm
    from shared.settings import Settings

    redis = start_redis(workdir / "finetune-redis")
    config = {
        "data_dir": str(workdir),
        "models": MODELS,
        "log_level": "WARNING",
        "redis_url": redis.url,
        "finetune": {"queue": "bench"},
    }
    settings = Settings.model_validate(config)
    for entry in settings.models:  # built before anything is timed
        load_causal_lm(entry, settings)
    api = spawn_service("finetune", workdir / "finetune-api", config)
    worker = spawn_worker(workdir / "finetune-worker", config, "bench-worker")
    llm = spawn_service("llm", workdir / "finetune-llm", config)
    rows: list[Row] = []
    try:
        with grpc.insecure_channel(api.address) as channel, grpc.insecure_channel(llm.address) as llm_channel:
            stub = finetune_pb2_grpc.FineTuneServiceStub(channel)
            llm_stub = llm_pb2_grpc.LLMServiceStub(llm_channel)
            run_id = int(time.time())
            queued_starts, first_tokens = [], []
            for model in ("tiny-llm", "llm-100m"):
                steps = STEPS[model]
                pairs = []
                warm_up = stub.CreateJob(_job(pb, model, f"bench-{model}-{run_id}-warm-up", 2))
                list(stub.WatchJob(pb.WatchJobRequest(id=warm_up.id)))  # the worker's first job of a model
                _in_process(settings, model, 2, workdir / f"inprocess-{model}-warm-up")
                for round_ in range(ROUNDS):
                    name = f"bench-{model}-{run_id}-{round_}"
                    start = time.perf_counter()
                    job = stub.CreateJob(_job(pb, model, name, steps))
                    running_seen = False
                    for event in stub.WatchJob(pb.WatchJobRequest(id=job.id)):
                        if event.type == "state" and event.state == pb.JOB_STATE_RUNNING and not running_seen:
                            queued_starts.append(time.perf_counter() - start)
                            running_seen = True
                        if event.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED):
                            break
                    through_queue = time.perf_counter() - start
                    first_tokens.append(_first_tokens(llm_stub, llm_pb2, model, name))
                    in_process = _in_process(settings, model, steps, workdir / f"inprocess-{model}-{round_}")
                    pairs.append((steps / through_queue, steps / in_process))
                rows.append(
                    Row.of_pairs(model, f"(h) steps/s, {steps}-step job through the queue", pairs, ".2f", "in process")
                )
            rows.append(
                Row(
                    "-",
                    "(i) CreateJob to RUNNING, idle worker, p50 / max",
                    f"{statistics.median(queued_starts) * 1000:.0f} / {max(queued_starts) * 1000:.0f} ms",
                    "-",
                    None,
                )
            )
            adapter = [a for a, _ in first_tokens]
            base = [b for _, b in first_tokens]
            rows.append(
                Row(
                    "-",
                    "(j) SUCCEEDED to first token with the new adapter, p50 / max",
                    f"{statistics.median(adapter) * 1000:.0f} / {percentile(adapter, 1.0) * 1000:.0f} ms",
                    f"{statistics.median(base) * 1000:.0f} ms (base model)",
                    statistics.median(adapter) / statistics.median(base),
                )
            )
    finally:
        llm.stop()
        worker.stop()
        api.stop()
        redis.stop()
    return rows


def _first_tokens(llm_stub, llm_pb2, model: str, adapter: str) -> tuple[float, float]:
    """Seconds to the first streamed token with the just-trained adapter (loaded on this first use), then
    with the base model."""
    times = []
    for name in (adapter, ""):
        request = llm_pb2.GenerateRequest(
            model=model, prompt=QUESTION, adapter=name, sampling=llm_pb2.SamplingParams(max_new_tokens=1)
        )
        start = time.perf_counter()
        next(iter(llm_stub.GenerateStream(request)))
        times.append(time.perf_counter() - start)
    return times[0], times[1]


NOTE = (
    f"Medians of {ROUNDS} rounds. (h) steps/s of the whole job (queue, claim, progress to Redis, adapter into the"
    " store) over the same run in process; 1.00 = no overhead, the target is >= 0.95. (i) as a watching client"
    " sees it; target < 1 s. (j) the adapter is read from the store on first use; target < 2 s."
)
