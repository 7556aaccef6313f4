"""Which records make up each optimizer step: a seeded order that resumes exactly and splits across DDP ranks.

The records are shuffled once per epoch (a permutation seeded by `seed + epoch`) and cut into full
optimizer batches of `batch_size × accumulation` records (a partial last one is dropped, as DDP needs);
each is cut into `accumulation` micro-batches of `batch_size`. Training takes these as one endless
stream, so the job trains exactly the steps it said, and step `s` is always the same records: a job
resumed at step `s` goes on with exactly the data it would have seen. Accumulation only changes how a
step's records are split, never which records a step has. Under DDP, rank `r` of `W` takes
`micro_batch[r::W]`: the ranks' micro-batches together are exactly the single-process one.
"""

from __future__ import annotations

import torch


class StepBatches:
    def __init__(
        self, num_records: int, batch_size: int, accumulation: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {world_size} DDP ranks")
        self.num_records = num_records
        self.batch_size, self.accumulation = batch_size, accumulation
        self.step_size = min(batch_size * accumulation, num_records)  # a small dataset is one step
        self.steps_per_epoch = max(1, num_records // (batch_size * accumulation))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's record indices of each micro-batch of optimizer step `step` (0-based, from the start)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed((self.seed + epoch) % 2**63)
            self._epoch, self._order = epoch, torch.randperm(self.num_records, generator=generator)
        records = self._order[index * self.step_size : (index + 1) * self.step_size]
        micro = [records[i : i + self.batch_size] for i in range(0, len(records), self.batch_size)]
        return [m[self.rank :: self.world_size].tolist() for m in micro if len(m)]
