"""The training loop under the LLM recipe, in process: accumulation and DDP equal one big batch, early
stopping stops, NaN steps are skipped and bounded, a checkpoint resumes exactly."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.finetune.hyperparams import LLM_TARGETS, Hyperparameters, TrainingData, resolve
from services.finetune.samples import llm_sample_jsonl
from services.finetune.training.launch import TrainingSpec, train_distributed, train_here
from services.finetune.training.loop import TooManyBadSteps, TrainingStopped
from services.finetune.training.recipe import RecipeContext, load_recipe
from shared.settings import ModelEntry

CPU = torch.device("cpu")
TINY_LLM = ModelEntry(name="tiny-llm", kind="llm", source="builtin:tiny-llm")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "data.jsonl"
    path.write_bytes(llm_sample_jsonl())
    return path


def spec_for(dataset: Path, job_dir: Path, **hyperparameters) -> TrainingSpec:
    data = TrainingData(
        kind="llm",
        num_records=40,
        architecture="llama",
        context_length=131072,
        record_type="prompt_completion",
        targets=LLM_TARGETS["llama"],
        model_defaults={"learning_rate": 5e-3},
    )
    # float32 unless a test asks: `auto` is bf16 on CPUs with native bf16, and the equivalence checks here
    # (accumulation against one batch, DDP against one process, resume) are meant for one dtype everywhere
    defaults = {"method": "lora", "mixed_precision": "no"}
    hp, total = resolve(Hyperparameters(**(defaults | hyperparameters)), data)
    return TrainingSpec("job", "llm", TINY_LLM, dataset, hp, total, job_dir)


class Recorder:
    """Hooks that remember what the loop said; `stop_at` asks it to stop (as a cancel would)."""

    def __init__(self, stop_at: int | None = None, reason=None):
        self.steps, self.evals, self.warnings, self.checkpoints = [], [], [], []
        self.stop_at, self.reason = stop_at, reason

    def stop_requested(self):
        return None

    def still_holds_lease(self):
        return True

    def started(self, resumed_from_step, total_steps):
        self.resumed_from = resumed_from_step

    def step(self, report):
        self.steps.append(report)
        return self.reason if self.stop_at is not None and report.step >= self.stop_at else None

    def evaluated(self, step, val_loss, improved):
        self.evals.append((step, val_loss, improved))

    def checkpointed(self, step):
        self.checkpoints.append(step)

    def warning(self, message):
        self.warnings.append(message)


def test_gradient_accumulation_equals_one_big_batch(settings, dataset, tmp_path):
    big = train_here(spec_for(dataset, tmp_path / "a", batch_size=8, max_steps=6), settings, None, None, CPU)
    accumulated = train_here(
        spec_for(dataset, tmp_path / "b", batch_size=4, gradient_accumulation_steps=2, max_steps=6),
        settings,
        None,
        None,
        CPU,
    )
    assert len(big.losses) == len(accumulated.losses) == 6
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(big.losses), rtol=1e-4, atol=1e-5)
    assert big.losses[-1] < big.losses[0]


def test_ddp_on_gloo_with_two_processes_equals_one_process_with_the_same_global_batch(settings, dataset, tmp_path):
    one = train_here(spec_for(dataset, tmp_path / "one", batch_size=8, max_steps=5), settings, None, None, CPU)
    two = train_distributed(
        spec_for(dataset, tmp_path / "two", batch_size=8, max_steps=5), settings, None, tmp_path / "adapter", 2
    )
    torch.testing.assert_close(torch.tensor(two.losses), torch.tensor(one.losses), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists(), "rank 0 wrote the adapter"


def test_early_stopping_stops_when_validation_stops_improving(settings, dataset, tmp_path):
    spec = spec_for(
        dataset,
        tmp_path,
        max_steps=400,
        eval_steps=1,
        early_stopping_patience=2,
        learning_rate=0.02,
        lr_scheduler="constant",
    )
    hooks = Recorder()
    result = train_here(spec, settings, hooks, None, CPU)
    assert result.stopped_early and result.steps < 400
    assert [improved for _, _, improved in hooks.evals[-2:]] == [False, False]
    assert result.best_val_loss == min(v for _, v, _ in hooks.evals)


def nan_after(model, steps: set[int], counter: list[int]):
    """Make the model's loss NaN on the given training forwards (a numeric fault, as fp16 overflow gives)."""
    forward = model.forward

    def faulty(*args, **kwargs):
        out = forward(*args, **kwargs)
        if model.training:
            counter[0] += 1
            if counter[0] in steps:
                out.logits = out.logits * float("nan")
        return out

    model.forward = faulty


@pytest.mark.parametrize(("bad", "fails"), [(2, False), (4, True)])
def test_nan_losses_skip_their_steps_and_too_many_fail_the_job(settings, dataset, tmp_path, bad, fails):
    settings = settings.model_copy(update={"finetune": settings.finetune.model_copy(update={"max_bad_steps": 3})})
    spec = spec_for(dataset, tmp_path, max_steps=10, validation_fraction=0.0)
    recipe = load_recipe("llm")(_context(spec, settings, hooks := Recorder()))
    recipe.setup()
    nan_after(recipe.model, set(range(3, 3 + bad)), [0])
    if fails:
        with pytest.raises(TooManyBadSteps, match="NaN or infinite in 4 steps"):
            recipe.train()
        return
    result = recipe.train()
    assert result.skipped_steps == bad and len(hooks.warnings) == bad
    assert result.steps == 10 and len(result.losses) == 10 - bad
    assert all(torch.isfinite(p).all() for p in recipe.model.parameters()), "no NaN reached the weights"


def test_a_stopped_run_resumes_from_its_checkpoint_exactly(settings, dataset, tmp_path):
    from services.finetune.training.loop import StopReason

    straight = train_here(
        spec_for(dataset, tmp_path / "straight", max_steps=12, save_steps=4), settings, None, None, CPU
    )
    job_dir = tmp_path / "interrupted"
    spec = spec_for(dataset, job_dir, max_steps=12, save_steps=4)
    with pytest.raises(TrainingStopped):
        train_here(spec, settings, Recorder(stop_at=6, reason=StopReason.PREEMPTED), None, CPU)
    hooks = Recorder()
    resumed = train_here(spec, settings, hooks, None, CPU)
    assert hooks.resumed_from == 6, "a preempted run checkpoints where it stops"
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[6:]), rtol=1e-5, atol=1e-6)
    shutil.rmtree(job_dir)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", id="cpu-bf16"),
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_bf16_autocast_trains_and_keeps_the_adapter_in_float32(settings, dataset, tmp_path, device):
    spec = spec_for(dataset, tmp_path, max_steps=8, mixed_precision="bf16", validation_fraction=0.0)
    recipe = load_recipe("llm")(replace(_context(spec, settings, None), device=torch.device(device)))
    recipe.setup()
    result = recipe.train()
    assert result.losses[-1] < result.losses[0]
    trainable = [p for p in recipe.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_trains_with_a_gradient_scaler(settings, dataset, tmp_path):
    spec = spec_for(dataset, tmp_path, max_steps=8, mixed_precision="fp16", validation_fraction=0.0)
    recipe = load_recipe("llm")(replace(_context(spec, settings, None), device=torch.device("cuda")))
    recipe.setup()
    result = recipe.train()
    assert recipe.trainer.scaler is not None and result.losses[-1] < result.losses[0]
    assert next(recipe.model.get_base_model().parameters()).dtype == torch.float16, "frozen base in half precision"


def test_profile_steps_write_a_trace(settings, dataset, tmp_path):
    train_here(spec_for(dataset, tmp_path, max_steps=3, profile_steps=2), settings, None, None, CPU)
    assert list((tmp_path / "profile").glob("trace-step1.json"))


def _context(spec: TrainingSpec, settings, hooks) -> RecipeContext:
    return RecipeContext(
        job_id=spec.job_id,
        base_model=settings.models[0],
        dataset_path=spec.dataset_path,
        hyperparameters=replace(spec.hyperparameters),
        total_steps=spec.total_steps,
        settings=settings,
        device=CPU,
        job_dir=spec.job_dir,
        hooks=hooks,
    )


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16"), (False, "no")])
def test_mixed_precision_auto_is_what_the_device_computes_natively(
    monkeypatch, settings, dataset, tmp_path, native_bf16, expected
):
    """The default (`auto`) is resolved by the recipe's context, whoever builds it: bf16 autocast on a CPU
    with native bf16, float32 on others; the base weights stay float32 on a CPU either way."""
    reported = {**torch.cpu.get_capabilities(), "amx_bf16": False, "avx512_bf16": native_bf16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: reported)
    spec = spec_for(dataset, tmp_path, max_steps=2, mixed_precision="auto")
    assert spec.hyperparameters.mixed_precision == "auto"
    context = _context(spec, settings, None)
    assert context.mixed_precision == context.loop_config().mixed_precision == expected
    assert context.base_dtype() == torch.float32
