"""The engine's KV cache: one row ("slot") of shared, preallocated buffers per sequence, admitted by budget.

Sequences are grouped by how long they may grow: a size class holds rows of `capacity` columns (256, 512,
1024, ... tokens), and each layer's keys and values of a class live in (rows, kv_heads, capacity,
head_dim) tensors. A sequence owns one row of its class from admission to its end, and its token i's KV
sits at column i. A step writes only the new columns of the rows it runs, so a sequence joins or leaves
without moving anybody's KV (the left-padded batch this replaced copied every row on every join and
leave). Classes keep one long prompt from making every chat row as long as it: memory and the zeroing of
new rows follow each sequence's own length, within a factor of two.

Memory is admitted, not hoped for: a sequence reserves room for its prompt and all its new tokens when it
is admitted, and is admitted only if the buffers that hold every reservation fit `budget_bytes`. So a
running sequence never runs out of cache, a request that could not fit even alone is refused up front,
and a waiting one is admitted as soon as finished ones make room: nothing can deadlock. Other buffers of
the engine that grow with use (the LoRA slots) hold bytes in the same budget (`hold`), so together they
never pass the memory the operator gave the cache.

A class's buffers grow to the next power of two of rows when an admission needs a row they lack; only
then are its rows copied, once per doubling, not on every join. A class's buffers are freed when its last
sequence leaves. Buffers are zero-filled: attention masks unused columns, and masked zeros stay harmless
where uninitialised memory could hold NaNs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

MIN_CAPACITY = 256  # the shortest class; chat requests (prompt + default 256 new tokens) mostly fit 512
GPU_MEMORY_FRACTION = 0.8  # of the memory free when the engine starts; the rest is activations' headroom
CPU_DEFAULT_BYTES = 4 * 2**30


@dataclass(frozen=True, order=True)
class Slot:
    """A sequence's row: row `row` of the size class whose rows hold `capacity` tokens."""

    capacity: int
    row: int


@dataclass
class _SizeClass:
    capacity: int
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer: (rows, kv_heads, capacity, head_dim)
    values: list[torch.Tensor] = field(default_factory=list)
    rows: int = 0  # usable rows allocated (a spare row may follow them)
    reserved: set[int] = field(default_factory=set)  # rows in use
    version: int = 0  # bumped whenever the buffers are replaced

    def free_row(self) -> int:
        return next(r for r in range(len(self.reserved) + 1) if r not in self.reserved)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only transformer's config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def capacity_for(tokens: int) -> int:
    """The size class of a sequence of up to `tokens` positions: the next power of two, at least MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << (max(tokens, 1) - 1).bit_length())


class SlotKV:
    def __init__(
        self,
        config,
        *,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
        max_rows: int,
        static_buffers: bool = False,
    ):
        """`static_buffers` (for CUDA graphs, which replay fixed addresses): a class keeps its buffers when
        it empties, until an admission needs the memory, and has one spare row past its usable ones, where
        a graph's padding tokens write."""
        self.static_buffers = static_buffers
        self._spare = 1 if static_buffers else 0
        self.layers, self.kv_heads, self.head_dim = kv_shape(config)
        self.query_groups = config.num_attention_heads // self.kv_heads  # query heads per KV head
        self.dtype, self.device = dtype, device
        self.budget_bytes = budget_bytes
        self.max_rows = max_rows  # the engine's batch size: no class needs more rows
        element = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = 2 * self.layers * self.kv_heads * self.head_dim * element  # keys and values
        self.held_bytes = 0  # held in this budget by other buffers (the LoRA slots); see `hold`
        self._classes: dict[int, _SizeClass] = {}
        self._versions = itertools.count(1)

    # -- admission -----------------------------------------------------------------------------------

    @property
    def max_tokens_alone(self) -> int:
        """The longest reservation (prompt + new tokens) that fits the budget with nothing else running."""
        available = self.budget_bytes - self.held_bytes
        capacity = MIN_CAPACITY
        if capacity * self.bytes_per_token > available:
            return 0
        while 2 * capacity * self.bytes_per_token <= available:
            capacity *= 2
        return capacity

    def fits(self, tokens: int) -> bool:
        """Would a sequence reserving `tokens` fit next to the running (and just reserved) ones?"""
        capacity = capacity_for(tokens)
        return self.reserved_bytes(capacity) + self.held_bytes <= self.budget_bytes

    def hold(self, nbytes: int) -> bool:
        """Set the bytes other buffers hold in this budget, if they fit next to the reserved rows' buffers;
        False (and nothing changes) if not. Kept empty classes give their memory up for them."""
        if self.reserved_bytes() + nbytes > self.budget_bytes:
            return False
        self.held_bytes = nbytes
        self._drop_kept_classes()
        return True

    def reserved_bytes(self, joining: int | None = None) -> int:
        """Bytes of the buffers every reserved row needs, with a new row of class `joining` if given. An
        empty class (kept for CUDA graphs) counts for nothing: it gives its memory up when it is needed."""
        candidate = None if joining is None else self._classes.get(joining) or _SizeClass(joining)
        classes = self._classes if candidate is None else {**self._classes, joining: candidate}
        total = 0
        for size_class in classes.values():
            rows = set(size_class.reserved)
            if size_class is candidate:
                rows.add(candidate.free_row())
            if rows:
                needed = max(size_class.rows, _rows_for(max(rows), self.max_rows)) + self._spare
                total += needed * size_class.capacity
        return total * self.bytes_per_token

    def reserve(self, tokens: int) -> Slot:
        """Book a row for a sequence of up to `tokens` positions (admission checked `fits`); `ensure` then
        makes the buffers hold it."""
        capacity = capacity_for(tokens)
        size_class = self._classes.setdefault(capacity, _SizeClass(capacity))
        row = size_class.free_row()
        size_class.reserved.add(row)
        return Slot(capacity, row)

    def ensure(self) -> None:
        """Grow the classes whose reserved rows lack buffers (to the next power of two of rows), copying
        their live rows once; then drop kept empty classes while over the budget."""
        for size_class in self._classes.values():
            if not size_class.reserved:
                continue
            rows = _rows_for(max(size_class.reserved), self.max_rows)
            if rows <= size_class.rows:
                continue
            shape = (rows + self._spare, self.kv_heads, size_class.capacity, self.head_dim)
            grown = []
            for old in (*size_class.keys, *size_class.values) or [None] * (2 * self.layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old is not None:
                    new[: size_class.rows] = old[: size_class.rows]
                grown.append(new)
            size_class.keys, size_class.values = grown[: self.layers], grown[self.layers :]
            size_class.rows = rows
            size_class.version = next(self._versions)
        self._drop_kept_classes()

    def _drop_kept_classes(self) -> None:
        """Free kept empty classes, longest first, while the buffers and the held bytes pass the budget."""
        for capacity in sorted(self._classes, reverse=True):
            if self.nbytes + self.held_bytes <= self.budget_bytes:
                break
            if not self._classes[capacity].reserved:
                del self._classes[capacity]

    def free(self, slot: Slot) -> None:
        size_class = self._classes[slot.capacity]
        size_class.reserved.discard(slot.row)
        if not size_class.reserved and not self.static_buffers:  # its last sequence left: free the memory
            del self._classes[slot.capacity]

    def clear(self) -> None:
        self._classes.clear()

    @property
    def nbytes(self) -> int:
        return sum((c.rows + self._spare) * c.capacity for c in self._classes.values()) * self.bytes_per_token

    def buffers(self, capacity: int) -> tuple[int, int, int]:
        """(usable rows, spare row or -1, version) of a class; the version changes when its buffers move."""
        size_class = self._classes[capacity]
        return size_class.rows, size_class.rows if self._spare else -1, size_class.version

    # -- contents --------------------------------------------------------------------------------------

    def layer(self, capacity: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (rows, kv_heads, capacity, head_dim) keys and values of one class and layer."""
        size_class = self._classes[capacity]
        return size_class.keys[layer], size_class.values[layer]

    def write(self, slot: Slot, start: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put KV computed elsewhere ((1, kv_heads, n, head_dim) per layer; a cached prefix) at columns
        start..start+n of `slot`."""
        size_class = self._classes[slot.capacity]
        for keys, values, (k, v) in zip(size_class.keys, size_class.values, layers, strict=True):
            end = start + k.shape[2]
            keys[slot.row, :, start:end] = k[0]
            values[slot.row, :, start:end] = v[0]

    def row_layers(self, slot: Slot, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of `slot`'s first `length` columns, (1, kv_heads, length, head_dim) per layer."""
        size_class = self._classes[slot.capacity]
        row = slice(slot.row, slot.row + 1)
        layers = zip(size_class.keys, size_class.values, strict=True)
        return [(k[row, :, :length], v[row, :, :length]) for k, v in layers]


def _rows_for(top_row: int, max_rows: int) -> int:
    """Rows a class allocates to hold row `top_row`: the next power of two, capped at the batch size."""
    return max(top_row + 1, min(max_rows, 1 << top_row.bit_length()))


def default_budget_bytes(device: torch.device) -> int:
    """Without llm.kv_cache_bytes: most of the accelerator memory left after the weights, or 4 GiB of RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_FRACTION)
    return CPU_DEFAULT_BYTES
