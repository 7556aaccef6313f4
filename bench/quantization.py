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
import time
from pathlib import Path

import grpc

from bench.finetune import sample_training_data
from bench.realmodel import MODEL, QUESTIONS
from bench.report import Row
from tests.harness import spawn_service

NEW_TOKENS = 32
ROUNDS = 2
# one dtype for everything left unquantized (embeddings, norms), so the ratios are the quantization's alone
SERVED = {"bf16": ("bfloat16", "none"), "nf4": ("bfloat16", "bnb-nf4"), "int8": ("bfloat16", "bnb-int8")}
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
    from shared.loaders import load_causal_lm
    from shared.settings import Settings

    settings = Settings.model_validate(settings_config)
    bf16, rows = infos["smollm2-bf16"], []
    for name in names[1:]:
        entry = next(e for e in settings.models if e.name == name)
        packed, params = quantized_linears(load_causal_lm(entry, settings).model)
        rows.append(_bytes_row(name, "(q1) weight bytes", infos[name].weight_bytes, bf16.weight_bytes))
        rows.append(_bytes_row(name, "(q1) its quantized linear layers", packed, params * 2))
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


def quantized_linears(model) -> tuple[int, int]:
    """(bytes, weights) of the model's quantized linear layers, scales included, biases not."""
    from shared.quantization import is_quantized_linear, weight_bytes

    layers = [m for m in model.modules() if is_quantized_linear(m)]
    packed = sum(weight_bytes(layer) - (layer.bias.nbytes if layer.bias is not None else 0) for layer in layers)
    return packed, sum(layer.in_features * layer.out_features for layer in layers)


def _train(config: dict, hyperparameters: dict, job_dir: str, queue) -> None:
    """In a fresh process: one LoRA job's setup and 4 steps; puts (base bytes, peak MiB over the start)."""
    import torch

    from services.finetune.hyperparams import Hyperparameters, resolve
    from services.finetune.samples import llm_sample_jsonl
    from services.finetune.training.memory import activations_kept, step_memory
    from services.finetune.training.recipe import RecipeContext, load_recipe
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
    recipe.setup()
    recipe.train()
    recipe.model.train()
    activations = activations_kept(
        recipe.model, lambda: recipe.loss_sum(recipe.model, recipe.batch_of(recipe.split.train[:4]))[0]
    )
    memory = step_memory(recipe.model, recipe.trainer.optimizer, activations)
    queue.put((memory, *quantized_linears(recipe.model.get_base_model())))


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
    plain = figures["LoRA"][0]
    rows = [Row("smollm2 LoRA", "(q2) training memory", _breakdown(plain), "-", None)]
    for label, (memory, packed, params) in list(figures.items())[1:]:
        name = f"smollm2 {label}"
        rows.append(Row(name, "(q2) training memory", _breakdown(memory), "LoRA", memory.total / plain.total))
        if packed:
            rows.append(_bytes_row(name, "(q2) frozen base weights", memory.frozen, plain.frozen / 2))
            rows.append(_bytes_row(name, "(q2) its quantized linear layers", packed, params * 2))
    return rows


QUESTION = "Question: Who keeps the Zephyr lighthouse?\nAnswer:"


def _adapter_rows(workdir: Path, config: dict) -> list[Row]:
    import torch

    from services.finetune.hyperparams import Hyperparameters, resolve
    from services.finetune.samples import llm_sample_jsonl
    from services.finetune.training.launch import TrainingSpec, train_here
    from shared.settings import Settings

    settings = Settings.model_validate({**config, "models": [{**MODEL, "dtype": "float32"}]})
    job_dir = workdir / "quantization-qlora"
    dataset = job_dir / "data.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_bytes(llm_sample_jsonl())
    hp, total = resolve(
        Hyperparameters(
            max_steps=12, learning_rate=2e-3, batch_size=4, validation_fraction=0, quantization="bnb-nf4",
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        sample_training_data(context_length=8192),
    )  # fmt: skip
    spec = TrainingSpec("bench-qlora", "llm", settings.models[0], dataset, hp, total, job_dir)
    train_here(spec, settings, None, job_dir / "adapter", torch.device("cpu"))
    (nf4_logits, nf4_ids, nf4_text), (full_logits, full_ids, full_text) = (
        _served_with_adapter(settings, quantization, job_dir / "adapter") for quantization in ("bnb-nf4", "none")
    )
    agreeing = next((i for i, (a, b) in enumerate(zip(nf4_ids, full_ids, strict=True)) if a != b), len(nf4_ids))
    drift = torch.nn.functional.kl_div(nf4_logits.log_softmax(-1), full_logits.log_softmax(-1), log_target=True,
                                       reduction="sum").item()  # fmt: skip
    learned = f"{'yes' if 'Okafor' in nf4_text else 'no'} / {'yes' if 'Okafor' in full_text else 'no'}"
    name = "smollm2 QLoRA adapter"
    return [
        Row(name, "(q3) next token after the prompt, KL(full base || NF4)", f"{drift:.3f} nats", "-", None),
        Row(name, "(q3) greedy tokens as on its NF4 base", f"{agreeing} of {len(nf4_ids)}", "-", None),
        Row(name, "(q3) states the fact: NF4 / full base", learned, "-", None),
    ]


def _served_with_adapter(settings, quantization: str, adapter_dir: Path):
    """The prompt's logits, 16 greedy tokens and their text, with the adapter over the base as `quantization`."""
    import torch

    from services.llm.lora import MultiLora
    from shared.loaders import load_causal_lm

    loaded = load_causal_lm(settings.models[0].model_copy(update={"quantization": quantization}), settings)
    lora = MultiLora(loaded.model, slots=1)
    lora.load(0, adapter_dir)
    lora.set_rows([0])
    ids = torch.tensor([loaded.tokenizer(QUESTION)["input_ids"]])
    with torch.inference_mode():
        logits = loaded.model(ids).logits[0, -1].float()
        out = loaded.model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    return logits, new, loaded.tokenizer.decode(new, skip_special_tokens=True)


def _breakdown(memory) -> str:
    """The step's total, and its frozen base and kept activations, in MiB."""
    return f"{memory.total / MiB:.0f} MiB (base {memory.frozen / MiB:.0f}, activations {memory.activations / MiB:.0f})"


def _bytes_row(model: str, measure: str, nbytes: float, bf16_bytes: float) -> Row:
    return Row(model, measure, f"{nbytes / MiB:.1f} MiB", f"{bf16_bytes / MiB:.1f} MiB (bf16)", nbytes / bf16_bytes)


def run(workdir: Path) -> list[Row]:
    from shared.loaders import prepare
    from shared.settings import Settings

    config = {"data_dir": str(workdir), "models": _entries(), "log_level": "WARNING"}
    settings = Settings.model_validate(config)
    prepare(settings.models[0], settings)  # converted once, before anything is measured
    return _serving_rows(workdir, config) + _training_rows(workdir, config) + _adapter_rows(workdir, config)


NOTE = (
    f"(q1): medians of {ROUNDS} rounds of {len(QUESTIONS)} chat requests x {NEW_TOKENS} tokens per model, the models"
    " taking turns, all computing in bf16 (emulated on this CPU). SmolLM2's tied 49k x 576 embedding stays"
    " unquantized: a fifth of its weights, so the whole model shrinks less than its linear layers. (q2): a job on a"
    " CPU holds its frozen base in float32, so QLoRA's base is the NF4 linear layers next to a float32 embedding;"
    " the bf16 figure is half the plain base's float32 bytes (every weight is a float). The lighthouse records are"
    " short (tens of tokens), so activations are a small part here; they grow with batch x sequence length."
    " (q3): one QLoRA job of 12 steps, then greedy decoding in process with the engine's multi-LoRA layers."
)
