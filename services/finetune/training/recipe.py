"""What a recipe is given and what it must do (torchtune's shape: setup / train / save / cleanup).

Recipes live in `services.finetune.recipes` and are found by job kind through `RECIPES` (module paths,
imported on use): nothing in the library imports a recipe.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from services.finetune.hyperparams import Hyperparameters
from services.finetune.training.data import DataPipeline, dataloader_workers
from services.finetune.training.loop import (
    AUTOCAST_DTYPES,
    CountFn,
    LoopConfig,
    LossFn,
    Trainer,
    TrainingHooks,
    TrainingResult,
)
from shared.devices import auto_mixed_precision
from shared.settings import ModelEntry, Settings

RECIPES = {
    "llm": "services.finetune.recipes.llm:LLMRecipe",
    "diffusion": "services.finetune.recipes.diffusion:DiffusionRecipe",
}


@dataclass
class RecipeContext:
    job_id: str
    base_model: ModelEntry
    dataset_path: Path
    hyperparameters: Hyperparameters
    total_steps: int
    settings: Settings
    device: torch.device
    job_dir: Path  # checkpoints, TensorBoard events, profiler traces
    hooks: TrainingHooks | None  # None on DDP ranks other than 0
    attempt: int = 1  # the job's attempt: its checkpoints go to their own folder
    validation_dataset_path: Path | None = None  # None: validation_fraction of the training dataset validates

    def loop_config(self) -> LoopConfig:
        hp = self.hyperparameters
        return LoopConfig(
            total_steps=self.total_steps,
            learning_rate=hp.learning_rate,
            batch_size=hp.batch_size,
            accumulation=hp.gradient_accumulation_steps,
            lr_scheduler=hp.lr_scheduler,
            warmup_ratio=hp.warmup_ratio,
            max_grad_norm=hp.max_grad_norm,
            mixed_precision=self.mixed_precision,
            seed=hp.seed,
            eval_steps=hp.eval_steps,
            early_stopping_patience=hp.early_stopping_patience,
            save_steps=hp.save_steps,
            profile_steps=hp.profile_steps,
            max_bad_steps=self.settings.finetune.max_bad_steps,
            optimizer=hp.optimizer or "adamw",
            dataloader_workers=dataloader_workers(self.settings.finetune.dataloader_workers, self.device),
        )

    def trainer(
        self,
        model: torch.nn.Module,
        data: DataPipeline,
        split: Split,
        loss_sum: LossFn,
        count: CountFn,
        groups: list[int] | None = None,
    ) -> Trainer:
        """The training loop for a recipe's model and records, configured from the job."""
        return Trainer(
            model,
            data,
            split.train,
            split.validation,
            loss_sum,
            count,
            self.loop_config(),
            self.job_dir,
            self.hooks,
            self.device,
            attempt=self.attempt,
            test_records=split.test,
            train_groups=groups,
        )

    @property
    def mixed_precision(self) -> str:
        """The job's mixed precision on this device: `auto` becomes what the device computes natively."""
        chosen = self.hyperparameters.mixed_precision
        return auto_mixed_precision(self.device) if chosen == "auto" else chosen

    def base_dtype(self) -> torch.dtype:
        """Frozen base weights in the autocast dtype on GPUs (half the memory); float32 elsewhere."""
        dtype = AUTOCAST_DTYPES[self.mixed_precision]
        return dtype if self.device.type == "cuda" and dtype is not None else torch.float32


class Recipe(Protocol):
    def __init__(self, context: RecipeContext) -> None: ...

    def setup(self) -> None:
        """Load the base model and the data, attach the adapter to train."""

    def train(self) -> TrainingResult:
        """Run the training loop (resuming from the job's checkpoint if there is one)."""

    def save(self, out_dir: Path) -> None:
        """Write the adapter in the format the serving side loads (everything it needs is in those files)."""

    def cleanup(self) -> None:
        """Free what setup took (GPU memory above all)."""


def load_recipe(kind: str) -> type[Recipe]:
    module, _, name = RECIPES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Split:
    """A job's records: those it trains on, those early stopping watches, and those only the end sees."""

    train: list
    validation: list
    test: list = field(default_factory=list)


def split_records(records: list, validation_fraction: float, seed: int, test_fraction: float = 0.0) -> Split:
    """A seeded split: the same job always validates (and tests) on the same records, disjoint from training."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(records) * validation_fraction)
    n_test = int(len(records) * test_fraction)
    return Split(
        train=[records[i] for i in order[n_val + n_test :]],
        validation=[records[i] for i in order[:n_val]],
        test=[records[i] for i in order[n_val : n_val + n_test]],
    )
