"""The training data path: a `DataLoader` whose batch sampler is `StepBatches`, so worker processes decode,
resize, augment and batch records off the training thread while resume stays exact and DDP ranks keep
their shards.

A recipe supplies a `DataPipeline`: `prepare(record, seed)` turns one record into an item (an image
decoded, resized and augmented; a token sequence) and `collate(items)` makes a batch of CPU tensors. Both
run in the loader's workers (or in the training process with no workers). An item's randomness comes only
from its `seed`, which depends on the job's seed, the step and the record, never on which worker took it
or how many there are: the same job gives the same batches with 0 workers or 8, and a resumed job the
batches it would have had. Memory is bounded by the batches in flight (`prefetch_factor` per worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from services.finetune.training.batches import StepBatches

EVALUATION_STEP = -1  # the key step of validation and test items: their randomness is the same every time


@dataclass(frozen=True)
class DataPipeline:
    """How a recipe's records become batches (both functions picklable: they run in worker processes)."""

    prepare: Callable[[Any, int], Any]  # (record, seed) -> item
    collate: Callable[[list[Any]], Any]  # items -> batch of CPU tensors


def dataloader_workers(configured: int | None, device: torch.device) -> int:
    """The worker processes of one training rank: as configured, else up to 4 per GPU rank (its host's cores
    shared among the ranks, one left for the rank itself) and none on a CPU, whose cores the training
    step already uses (`make bench --only training_data` measures workers slower there)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return 0
    ranks = max(1, torch.cuda.device_count())
    return max(1, min(4, (os.cpu_count() or 2) // ranks - 1))


def item_seed(seed: int, step: int, index: int) -> int:
    """The seed of record `index`'s augmentation at optimizer step `step` (EVALUATION_STEP: evaluation)."""
    return (seed * 1_000_003 + (step + 1) * 7_919 + index) % 2**63


class _KeyedRecords(Dataset):
    """Records looked up by (step, index) keys, each prepared with its own seed."""

    def __init__(self, records: Sequence[Any], pipeline: DataPipeline, seed: int):
        self.records, self.pipeline, self.seed = records, pipeline, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        step, index = key
        return self.pipeline.prepare(self.records[index], item_seed(self.seed, step, index))


class _StepSampler(Sampler):
    """Every micro-batch of this rank from `first_step` on, in training order, as (step, index) keys."""

    def __init__(self, batches: StepBatches, first_step: int, total_steps: int):
        self.batches, self.first_step, self.total_steps = batches, first_step, total_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.first_step, self.total_steps):
            for micro in self.batches.micro_batches(step):
                yield [(step, index) for index in micro]

    def __len__(self) -> int:
        return sum(len(self.batches.micro_batches(s)) for s in range(self.first_step, self.total_steps))


class _ChunkSampler(Sampler):
    """Evaluation: `indices` in chunks of `size`, keyed at EVALUATION_STEP."""

    def __init__(self, indices: list[int], size: int):
        self.indices, self.size = indices, size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.indices), self.size):
            yield [(EVALUATION_STEP, i) for i in self.indices[start : start + self.size]]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.size)


def _loader(records, pipeline: DataPipeline, sampler: Sampler, seed: int, workers: int, device, persistent: bool):
    return DataLoader(
        _KeyedRecords(records, pipeline, seed),
        batch_sampler=sampler,
        collate_fn=pipeline.collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        # the loader draws its workers' base seed from this, not from the training RNG it would otherwise
        # advance (items take their seeds from item_seed, so the base seed changes nothing they do)
        generator=torch.Generator().manual_seed(seed),
    )


def training_batches(
    records: Sequence[Any],
    pipeline: DataPipeline,
    batches: StepBatches,
    first_step: int,
    total_steps: int,
    seed: int,
    workers: int,
    device: torch.device,
) -> Iterator[Any]:
    """This rank's micro-batches from `first_step` to the end of training, prepared ahead by `workers`."""
    sampler = _StepSampler(batches, first_step, total_steps)
    return iter(_loader(records, pipeline, sampler, seed, workers, device, persistent=True))


def evaluation_batches(
    records: Sequence[Any],
    pipeline: DataPipeline,
    indices: list[int],
    size: int,
    seed: int,
    workers: int,
    device: torch.device,
) -> Iterator[Any]:
    """The batches of `records[indices]`, in order, for validation or the final test."""
    workers = min(workers, -(-len(indices) // size))  # no more processes than batches
    return iter(_loader(records, pipeline, _ChunkSampler(indices, size), seed, workers, device, persistent=False))
