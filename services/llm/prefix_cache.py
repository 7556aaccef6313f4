"""Reuse of prompt-prefix KV across requests: a chat's system prompt and template are prefilled once.

A prompt is cut into blocks of `block_tokens` token ids. Each cached block holds that block's keys and
values for every layer, computed at the block's own positions, and is found by its parent block and its
token ids, so a block matches only behind exactly the same tokens (keys are exact tuples, not hashes: no
collision can hand a request another prompt's KV). A namespace separates what changes the KV for the same
tokens: the LoRA adapter (name and version) a request runs with.

Blocks are evicted least recently used once the cache holds more than `capacity_bytes`. A lookup touches
a prefix's blocks from the last to the first, so a parent is always more recent than its children and is
never evicted before them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (1, heads, tokens, head_dim)


@dataclass
class _Block:
    id: int
    layers: list[LayerKV]
    nbytes: int


class PrefixCache:
    def __init__(self, block_tokens: int, capacity_bytes: int):
        self.block_tokens = block_tokens
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[tuple[Hashable, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _path(self, namespace: Hashable, tokens: list[int], max_blocks: int) -> list[tuple[tuple, _Block]]:
        """The cached blocks that start `tokens`, in order (at most `max_blocks`)."""
        found: list[tuple[tuple, _Block]] = []
        parent: Hashable = ("root", namespace)
        size = self.block_tokens
        for i in range(max_blocks):
            key = (parent, tuple(tokens[i * size : (i + 1) * size]))
            block = self._blocks.get(key)
            if block is None:
                break
            found.append((key, block))
            parent = block.id
        return found

    def lookup(self, namespace: Hashable, tokens: list[int]) -> tuple[int, list[list[LayerKV]]]:
        """How many leading tokens have cached KV, and that KV block by block (per layer, (1, H, block, D)),
        to be copied where the caller keeps it; the cache's own tensors, never written to.

        At least one token is always left out: its forward gives the logits of the first new token."""
        if not self.enabled:
            return 0, []
        path = self._path(namespace, tokens, (len(tokens) - 1) // self.block_tokens)
        if not path:
            return 0, []
        for key, _ in reversed(path):
            self._blocks.move_to_end(key)
        return len(path) * self.block_tokens, [block.layers for _, block in path]

    def insert(self, namespace: Hashable, tokens: list[int], layers: list[LayerKV]) -> None:
        """Cache the full blocks of `tokens` whose KV is in `layers` ((1, H, >= len(tokens), D) each, token i at
        column i); blocks already cached are only touched."""
        if not self.enabled:
            return
        size = self.block_tokens
        parent: Hashable = ("root", namespace)
        path = []
        for i in range(len(tokens) // size):
            key = (parent, tuple(tokens[i * size : (i + 1) * size]))
            block = self._blocks.get(key)
            if block is None:
                columns = slice(i * size, (i + 1) * size)
                kv = [(k[:, :, columns].clone(), v[:, :, columns].clone()) for k, v in layers]
                nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
                block = self._blocks[key] = _Block(next(self._ids), kv, nbytes)
                self.nbytes += nbytes
            path.append(key)
            parent = block.id
        for key in reversed(path):
            self._blocks.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.nbytes -= block.nbytes

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0
