"""CUDA graphs of decode steps: one graph replay instead of hundreds of kernel launches a step.

A decode step of a small or mid-sized model on a GPU is bound by launching kernels, not by computing:
every layer launches a dozen of them for a handful of tokens. A CUDA graph records a step's launches once
and replays them with one call. Graphs need fixed shapes and addresses, so a graph here is one decode-only
step of `bucket` tokens over one size class of the slot cache:
- the batch is padded up to the next bucket (1, 2, 4, 8, 16, ...); padding tokens write their KV into the
  class's spare row (`SlotKV(static_buffers=True)`) and their outputs are ignored;
- attention spans the rows' first `length` columns, a power of two (from 256) past the longest row, the
  mask hiding each row's unused columns: a graph serves many steps, and a long class (131,072 columns)
  does not make every step attend to all of it;
- inputs, write positions and masks live in static tensors that each replay first refills.
Steps that prefill, mix size classes, or run an adapter (LoRA or p-tuning) take the eager path. A graph is
captured at the first step of its shape (class, bucket, length) and recaptured when its class's buffers
move (a reshape).

`StaticDecode` runs the same static plan without a graph too (`capture=False`): that is how the CPU
tests check the padding, the spare row and the full-row masks against the eager path.
"""

from __future__ import annotations

import logging

import torch

from services.llm.batch import attention_backends, no_mask
from services.llm.kv_slots import SlotKV
from services.llm.slot_attention import DecodeGroup, StepPlan, decode_mask, write_positions

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_LENGTH = 256
WARMUP_STEPS = 2  # eager runs on a side stream before capture, as torch's graph docs ask


def bucket_for(count: int) -> int | None:
    return next((b for b in BUCKETS if b >= count), None)


def length_for(columns: int, capacity: int) -> int:
    """Columns a graph attends: the next power of two from MIN_LENGTH, within the class's rows."""
    return min(capacity, max(MIN_LENGTH, 1 << (columns - 1).bit_length()))


class _Graph:
    """One captured (or, without capture, eagerly replayed) decode step of `bucket` tokens over a class,
    attending to its rows' first `length` columns."""

    def __init__(self, model, kv: SlotKV, capacity: int, bucket: int, length: int, pool, capture: bool):
        device = kv.device
        usable, spare, self.version = kv.buffers(capacity)
        rows = usable + 1  # attention spans the usable rows and the spare one
        self.spare, self.rows, self.length, self.bucket = spare, rows, length, bucket
        self.input_ids = torch.zeros((1, bucket), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((1, bucket), dtype=torch.long, device=device)
        self.capacity, self.kv_heads = capacity, kv.kv_heads
        self.write_rows = torch.full((bucket,), spare, dtype=torch.long, device=device)
        self.positions = write_positions([spare] * bucket, [0] * bucket, kv.kv_heads, capacity).to(device)
        self.mask = torch.zeros((rows, 1, 1, length), dtype=torch.bool, device=device)
        self.mask[:, :, :, 0] = True
        group = DecodeGroup(capacity, 0, bucket, rows, length, False, self.write_rows, self.mask)
        self.plan = StepPlan(kv, {capacity: (None, self.positions)}, [group], [])
        self.model = model
        self.no_mask = no_mask(device)
        self.graph = None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    self._run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = self._run()

    def _run(self) -> torch.Tensor:
        with torch.inference_mode(), attention_backends():
            out = self.model(
                input_ids=self.input_ids,
                position_ids=self.position_ids,
                attention_mask=self.no_mask,
                use_cache=False,
                logits_to_keep=0,
                step=self.plan,
            )
        return out.logits[0]

    def replay(self, rows: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        """Logits (len(rows), V) of one decode step: token i at position i of class row i."""
        n, pad = len(rows), self.bucket - len(rows)
        padded_rows, padded_positions = rows + [self.spare] * pad, positions + [0] * pad
        host = torch.tensor([tokens + [0] * pad, padded_positions, padded_rows])
        host = host.to(self.input_ids.device, non_blocking=True)
        self.input_ids[0].copy_(host[0])
        self.position_ids[0].copy_(host[1])
        self.write_rows.copy_(host[2])
        written = write_positions(padded_rows, padded_positions, self.kv_heads, self.capacity)
        self.positions.copy_(written.to(self.positions.device, non_blocking=True))
        self.mask.copy_(decode_mask(self.rows, rows, positions, self.length), non_blocking=True)
        if self.graph is None:
            return self._run()[:n]
        self.graph.replay()
        return self.logits[:n]


class StaticDecode:
    """Decode steps through captured graphs (or static plans run eagerly, `capture=False`), one per class
    and bucket."""

    def __init__(self, model, kv: SlotKV, capture: bool = True):
        if not kv.static_buffers:
            raise ValueError("CUDA graphs need SlotKV(static_buffers=True)")
        self.model, self.kv, self.capture = model, kv, capture
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def applies(self, capacities: set[int], count: int) -> bool:
        return len(capacities) == 1 and bucket_for(count) is not None

    def step(self, capacity: int, rows: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        bucket, length = bucket_for(len(rows)), length_for(max(positions) + 1, capacity)
        key = (capacity, bucket, length)
        graph = self._graphs.get(key)
        if graph is None or graph.version != self.kv.buffers(capacity)[2]:
            self._drop(capacity)
            graph = _Graph(self.model, self.kv, capacity, bucket, length, self._pool, self.capture)
            self._graphs[key] = graph
            log.info(
                "decode graph ready",
                extra={"capacity": capacity, "bucket": bucket, "length": length, "captured": self.capture},
            )
        return graph.replay(rows, positions, tokens)

    def _drop(self, capacity: int) -> None:
        """Forget a class's graphs whose buffers moved (they would replay into freed memory)."""
        version = self.kv.buffers(capacity)[2]
        for key in [k for k, g in self._graphs.items() if k[0] == capacity and g.version != version]:
            del self._graphs[key]
