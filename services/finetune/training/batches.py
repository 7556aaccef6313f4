"""Which records make up each optimizer step: a seeded order that resumes exactly and splits across DDP ranks.

The records are shuffled once per epoch (a permutation seeded by `seed + epoch`) and cut into full
optimizer batches of `batch_size × accumulation` records (a partial last one is dropped, as DDP needs);
each is cut into `accumulation` micro-batches of `batch_size`. Training takes these as one endless
stream, so the job trains exactly the steps it said, and step `s` is always the same records: a job
resumed at step `s` goes on with exactly the data it would have seen. Accumulation only changes how a
step's records are split, never which records a step has. Under DDP, rank `r` of `W` takes
`micro_batch[r::W]`: the ranks' micro-batches together are exactly the single-process one.

With `groups` (an image's aspect bucket), micro-batches hold records of one group: each epoch's
permutation is cut group by group into micro-batches, the groups' leftovers pooled into mixed ones, and
the micro-batches shuffled (seeded) before they are dealt out to steps. An epoch still has the same
number of steps, and one group is exactly the ungrouped order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepBatches:
    def __init__(
        self,
        num_records: int,
        batch_size: int,
        accumulation: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[int] | None = None,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {world_size} DDP ranks")
        self.num_records = num_records
        self.batch_size, self.accumulation = batch_size, accumulation
        self.step_size = min(batch_size * accumulation, num_records)  # a small dataset is one step
        self.steps_per_epoch = max(1, num_records // (batch_size * accumulation))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        grouped = groups is not None and len(set(groups)) > 1 and self.step_size == batch_size * accumulation
        self.groups = list(groups) if grouped else None
        self._epoch, self._micro = -1, []

    @property
    def micro_batches_per_step(self) -> int:
        return -(-self.step_size // self.batch_size)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's record indices of each micro-batch of optimizer step `step` (0-based, from the start)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._micro = epoch, self._epoch_micro_batches(epoch)
        per_step = self.micro_batches_per_step
        micro = self._micro[index * per_step : (index + 1) * per_step]
        return [m[self.rank :: self.world_size] for m in micro if len(m)]

    def _epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed((self.seed + epoch) % 2**63)
        order = torch.randperm(self.num_records, generator=generator).tolist()
        size = self.batch_size
        if self.groups is None:
            micro = []
            for start in range(0, self.steps_per_epoch * self.step_size, self.step_size):
                records = order[start : start + self.step_size]
                micro += [records[i : i + size] for i in range(0, len(records), size)]
            return micro
        members: dict[int, list[int]] = {}
        for record in order:
            members.setdefault(self.groups[record], []).append(record)
        full, leftovers = [], []
        for records in members.values():
            cut = len(records) - len(records) % size
            full += [records[i : i + size] for i in range(0, cut, size)]
            leftovers += records[cut:]
        full += [leftovers[i : i + size] for i in range(0, len(leftovers) - len(leftovers) % size, size)]
        return [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
