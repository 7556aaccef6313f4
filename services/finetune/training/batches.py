"""Which records make up each micro-batch: a seeded stream that resumes exactly and splits across DDP ranks.

The records are shuffled once per epoch (a permutation seeded by `seed + epoch`) and cut into full
batches of the global batch size; a partial last batch is dropped. Training consumes this as one endless
stream of micro-batches, so an optimizer step (`accumulation` micro-batches) may span an epoch boundary
and the number of steps is exactly what the job said. Micro-batch `m` is always the same records, so a
job resumed at step `s` continues at micro-batch `s × accumulation`. Under DDP, rank `r` of `W` takes
`batch[r::W]`: the ranks' batches together are exactly the single-process batch.
"""

from __future__ import annotations

import torch


class MicroBatches:
    def __init__(self, num_records: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {world_size} DDP ranks")
        self.num_records = num_records
        self.batch_size = min(batch_size, num_records)  # a dataset smaller than a batch is one batch
        self.per_epoch = max(1, num_records // batch_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_batch: int) -> list[int]:
        """This rank's record indices of micro-batch `micro_batch` (counted from the start of training)."""
        epoch, index = divmod(micro_batch, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_records, generator=generator)
        batch = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return batch[self.rank :: self.world_size].tolist()

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.per_epoch
