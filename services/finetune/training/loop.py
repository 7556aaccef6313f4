"""The training loop every recipe runs: accumulation, mixed precision, clipping, LR schedule, NaN skips,
validation with early stopping, checkpoints and resume, profiling, DDP, and progress to the hooks.

A recipe supplies the model (its trainable parameters already marked), the train, validation and test
records, the `DataPipeline` that makes batches of them (in DataLoader workers, see `training.data`),
`loss_sum(model, batch) -> (sum of per-item losses, items)` and `count_items(batch)`; items are the
tokens that carry loss for an LLM, images for diffusion. Each optimizer step's loss is that sum over
every micro-batch of the step on every rank, divided by the global item count, so accumulation and DDP
give the same gradients as one big batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from services.finetune.training import checkpoint
from services.finetune.training.batches import StepBatches
from services.finetune.training.checkpoint import LoopState
from services.finetune.training.data import DataPipeline, evaluation_batches, training_batches
from services.finetune.training.optimizers import make_optimizer

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]  # (model, batch) -> (loss sum, items)
CountFn = Callable[[Any], int]  # items (tokens, images) in a batch, without running the model


class StopReason(StrEnum):
    CANCELLED = "cancelled"  # the user asked: stop, keep nothing
    PREEMPTED = "preempted"  # the worker is shutting down: checkpoint, hand the job back
    LEASE_LOST = "lease_lost"  # another worker owns the job now: stop, write nothing


class TrainingStopped(Exception):
    def __init__(self, reason: StopReason, step: int):
        super().__init__(f"training stopped at step {step}: {reason}")
        self.reason, self.step = reason, step


class TooManyBadSteps(Exception):
    """The loss was NaN or infinite for more steps than allowed."""


@dataclass(frozen=True)
class StepReport:
    step: int
    total_steps: int
    train_loss: float
    learning_rate: float
    throughput: float  # items (tokens or images) per second
    eta_seconds: float
    step_seconds: float
    skipped_steps: int = 0  # NaN/Inf steps so far, in this job (a resumed run included)


class TrainingHooks(Protocol):
    """How the loop reports; `step` may ask it to stop. Only rank 0's hooks are called."""

    def stop_requested(self) -> StopReason | None:
        """Asked around setup (before training's first step), where `step` cannot be."""

    def still_holds_lease(self) -> bool:
        """Asked before a checkpoint is written and before old ones are pruned: False, and nothing is."""

    def started(self, resumed_from_step: int, total_steps: int) -> None: ...

    def step(self, report: StepReport) -> StopReason | None: ...

    def evaluated(self, step: int, val_loss: float, improved: bool) -> None: ...

    def checkpointed(self, step: int) -> None: ...

    def warning(self, message: str) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    learning_rate: float
    batch_size: int  # global: across accumulation micro-batches' ranks, per micro-batch
    accumulation: int
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    mixed_precision: str  # no | bf16 | fp16 (the recipe context resolved `auto`)
    seed: int
    eval_steps: int
    early_stopping_patience: int
    save_steps: int
    profile_steps: int
    max_bad_steps: int
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    dataloader_workers: int = 0  # processes that prepare batches; 0: this one


@dataclass
class TrainingResult:
    steps: int
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    skipped_steps: int
    resumed_from_step: int
    seconds: float
    losses: list[float]  # the training loss of each step this run took (skipped steps left out)
    test_loss: float | None = None  # on the held-out test records, with the final (best validated) weights


def lr_lambda(config: LoopConfig) -> Callable[[int], float]:
    warmup = int(config.total_steps * config.warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, config.total_steps - warmup)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # `auto` is resolved before


def _autocast(device: torch.device, mixed_precision: str):
    dtype = AUTOCAST_DTYPES[mixed_precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_across_ranks(*values: float, device: torch.device) -> list[float]:
    if _world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors on the training device (pinned ones copied asynchronously)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


class Trainer:
    """One training run of a recipe's model; `run()` trains (resuming if a checkpoint exists)."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: DataPipeline,
        train_records: Sequence[Any],
        val_records: Sequence[Any],
        loss_sum: LossFn,
        count_items: CountFn,
        config: LoopConfig,
        job_dir: Path,
        hooks: TrainingHooks | None,
        device: torch.device,
        attempt: int = 1,
        test_records: Sequence[Any] = (),
        train_groups: Sequence[int] | None = None,  # each training record's group (aspect bucket)
    ):
        self.rank, self.world_size = _world()
        self.model = model
        self.ddp_model = (
            torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
            if self.world_size > 1
            else model
        )
        self.data = data
        self.train_records, self.val_records, self.test_records = train_records, val_records, test_records
        self.loss_sum, self.count_items = loss_sum, count_items
        self.config = config
        self.job_dir, self.attempt = job_dir, attempt
        self.hooks = hooks if self.rank == 0 else None
        self.device = device
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(
            config.optimizer, self.parameters, config.learning_rate, config.weight_decay, device
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        use_scaler = config.mixed_precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.batches = StepBatches(
            len(train_records),
            config.batch_size,
            config.accumulation,
            config.seed,
            self.rank,
            self.world_size,
            groups=train_groups,
        )
        self.state = LoopState()
        self.best: dict[str, torch.Tensor] | None = None
        self.history: list[float] = []  # train losses, for tests and the final report
        self._train_batches = None  # the DataLoader's iterator over this run's micro-batches

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        started = time.perf_counter()
        resumed_from = self._resume()
        if self.hooks:
            self.hooks.started(resumed_from, self.config.total_steps)
        self._train_batches = training_batches(
            self.train_records,
            self.data,
            self.batches,
            resumed_from,
            self.config.total_steps,
            self.config.seed,
            self.config.dataloader_workers,
            self.device,
        )
        try:
            return self._train(started, resumed_from)
        finally:
            self._train_batches = None  # its workers stop with it

    def _train(self, started: float, resumed_from: int) -> TrainingResult:
        stopped_early = False
        profiler = self._profiler(resumed_from)
        window_start, window_items = time.perf_counter(), 0.0
        while self.state.step < self.config.total_steps:
            step_started = time.perf_counter()
            loss, items = self._optimizer_step()
            if profiler is not None:
                profiler.step()
                if self.state.step >= resumed_from + self.config.profile_steps:
                    profiler.stop()
                    profiler = None
            window_items += items
            if loss is not None:
                self.history.append(loss)
                self.state.last_train_loss = loss
            elapsed = time.perf_counter() - window_start
            throughput = window_items / elapsed if elapsed > 0 else 0.0
            done = self.state.step - resumed_from
            eta = (time.perf_counter() - started) / done * (self.config.total_steps - self.state.step) if done else 0
            reason = self._report(
                StepReport(
                    step=self.state.step,
                    total_steps=self.config.total_steps,
                    train_loss=self.state.last_train_loss,
                    learning_rate=self.scheduler.get_last_lr()[0],
                    throughput=throughput,
                    eta_seconds=eta,
                    step_seconds=time.perf_counter() - step_started,
                    skipped_steps=self.state.skipped_steps,
                )
            )
            if reason is not None:
                if reason is StopReason.PREEMPTED:
                    self._checkpoint()
                raise TrainingStopped(reason, self.state.step)
            due = self.state.step % self.config.eval_steps == 0 or self.state.step == self.config.total_steps
            if self.val_records and due and self._evaluate():
                stopped_early = True
                break
            if self.state.step % self.config.save_steps == 0 and self.state.step < self.config.total_steps:
                self._checkpoint()
        if profiler is not None:
            profiler.stop()
        if self.best is not None:  # end on the best validated weights
            checkpoint.load_trainable(self.model, self.best)
        self._train_batches = None
        test_loss = self.evaluate(self.test_records) if self.test_records else None
        return TrainingResult(
            steps=self.state.step,
            train_loss=self.state.last_train_loss,
            val_loss=self.state.last_val_loss if self.val_records else None,
            best_val_loss=self.state.best_val_loss if self.val_records else None,
            stopped_early=stopped_early,
            skipped_steps=self.state.skipped_steps,
            resumed_from_step=resumed_from,
            seconds=time.perf_counter() - started,
            losses=list(self.history),
            test_loss=test_loss,
        )

    def _optimizer_step(self) -> tuple[float | None, float]:
        """One optimizer step over `accumulation` micro-batches; returns (mean loss or None if skipped, items)."""
        self.model.train()
        micro = [next(self._train_batches) for _ in range(self.batches.micro_batches_per_step)]  # on the CPU
        losses = []
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the global item count first: it normalizes every micro-batch's loss
            local_items = sum(self.count_items(batch) for batch in micro)
        (global_items,) = _sum_across_ranks(float(local_items), device=self.device)
        global_items = max(global_items, 1.0)
        bad = False
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.ddp_model.no_sync()
            with sync:
                with _autocast(self.device, self.config.mixed_precision):
                    loss_sum, _ = self.loss_sum(self.ddp_model, _to_device(batch, self.device))
                loss = loss_sum.float() / global_items * self.world_size  # DDP averages over ranks
                bad = bad or not bool(torch.isfinite(loss))
                # backward even when bad: every rank must join DDP's gradient all-reduce; the step is dropped
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            losses.append(float(loss_sum.detach().float()))
        (bad_anywhere, loss_total) = _sum_across_ranks(float(bad), sum(losses), device=self.device)
        if bad_anywhere or not math.isfinite(loss_total):
            return self._skip_bad_step(), float(local_items)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        return loss_total / global_items, float(local_items)

    def _skip_bad_step(self) -> None:
        """A NaN/Inf loss: drop this step's gradients, count it, and fail past the bound."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.step += 1  # its micro-batches are consumed: the next step reads fresh data
        self.scheduler.step()
        message = f"step {self.state.step}: the loss was NaN or infinite; the step was skipped"
        if self.hooks:
            self.hooks.warning(message)
        log.warning(message)
        if self.state.skipped_steps > self.config.max_bad_steps:
            raise TooManyBadSteps(
                f"the loss was NaN or infinite in {self.state.skipped_steps} steps (the limit is "
                f"{self.config.max_bad_steps}); lower learning_rate, raise max_grad_norm's strictness or check the data"
            )
        return None

    @torch.no_grad()
    def evaluate(self, records: Sequence[Any] | None = None) -> float:
        """Mean loss per item over every rank's share of `records` (the validation records by default)."""
        records = self.val_records if records is None else records
        self.model.eval()
        total, items = 0.0, 0
        size = max(1, self.config.batch_size // self.world_size)
        mine = list(range(self.rank, len(records), self.world_size))
        batches = evaluation_batches(
            records, self.data, mine, size, self.config.seed, self.config.dataloader_workers, self.device
        )
        for batch in batches:
            with _autocast(self.device, self.config.mixed_precision):
                loss_sum, n = self.loss_sum(self.model, _to_device(batch, self.device))
            total += float(loss_sum.float())
            items += n
        total, items = _sum_across_ranks(total, float(items), device=self.device)
        return total / max(items, 1.0)

    def _evaluate(self) -> bool:
        """Validate; returns True when early stopping says to stop."""
        val_loss = self.evaluate()
        self.state.last_val_loss = val_loss
        improved = val_loss < self.state.best_val_loss
        if improved:
            self.state.best_val_loss = val_loss
            self.state.evals_without_improvement = 0
            self.best = checkpoint.trainable_state(self.model)
        else:
            self.state.evals_without_improvement += 1
        if self.hooks:
            self.hooks.evaluated(self.state.step, val_loss, improved)
        patience = self.config.early_stopping_patience
        return bool(patience) and self.state.evals_without_improvement >= patience

    def _report(self, report: StepReport) -> StopReason | None:
        reason = self.hooks.step(report) if self.hooks else None
        if self.world_size == 1:
            return reason
        code = torch.tensor([list(StopReason).index(reason) + 1 if reason else 0], device=self.device)
        dist.broadcast(code, src=0)  # rank 0 decides for every rank
        return list(StopReason)[int(code) - 1] if int(code) else None

    def _checkpoint(self) -> None:
        """Rank 0 saves while the job's lease is still this attempt's; every rank stops if it is not."""
        saved = True
        if self.rank == 0:
            try:
                checkpoint.save(
                    self.job_dir,
                    self.attempt,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    self.scaler,
                    self.state,
                    self.best,
                    still_holds_lease=self._still_holds_lease,
                )
            except checkpoint.LeaseLost as lost:
                log.warning("no checkpoint: %s", lost)
                saved = False
            else:
                if self.hooks:
                    self.hooks.checkpointed(self.state.step)
        if not self._agree(saved):
            raise TrainingStopped(StopReason.LEASE_LOST, self.state.step)

    def _still_holds_lease(self) -> bool:
        return self.hooks.still_holds_lease() if self.hooks else True

    def _agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (a synchronization point under DDP)."""
        if self.world_size == 1:
            return flag
        code = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(code, src=0)
        return bool(int(code))

    def _resume(self) -> int:
        restored = checkpoint.restore_latest(
            self.job_dir, self.attempt, self.model, self.optimizer, self.scheduler, self.scaler
        )
        if restored is None:
            torch.manual_seed(self.config.seed + self.rank)  # DDP ranks draw their own noise and dropout
            return 0
        self.state, self.best = restored
        if self.rank:  # the checkpoint holds rank 0's random state: the other ranks derive their own
            torch.manual_seed(self.config.seed + self.rank * 1_000_003 + self.state.step)
        log.info("resumed from a checkpoint", extra={"step": self.state.step})
        return self.state.step

    def _profiler(self, first_step: int):
        if not self.config.profile_steps or self.rank != 0:
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        folder = self.job_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)

        def export(profiler) -> None:
            profiler.export_chrome_trace(str(folder / f"trace-step{first_step + 1}.json"))

        profiler = torch.profiler.profile(activities=activities, record_shapes=True, on_trace_ready=export)
        profiler.start()
        return profiler
