"""The running batch's KV cache: left-padded rows that can join and leave between decode steps.

This is TGI's `concatenate` / `filter` on top of transformers' `DynamicCache`: every row's keys and
values are right-aligned, padding sits on the left and is masked out, so a decode step is one forward
of shape (B, 1). New rows are prefilled on their own and then merged in by padding the shorter side;
finished rows are dropped, and padding columns no row needs any more are trimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_cache_support(model) -> None:
    """Refuse, at load time, models whose cache layers this batch cannot merge (e.g. sliding windows)."""
    for layer in DynamicCache(config=model.config).layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"continuous batching supports full-attention KV caches only, not {type(layer).__name__}"
            )


class KVBatch:
    def __init__(self, cache: DynamicCache, attention_mask: torch.Tensor):
        self.cache = cache
        self.attention_mask = attention_mask  # (B, T): 1 for real tokens, 0 for left padding

    @property
    def size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    @classmethod
    def of_one_row(cls, model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KVBatch:
        """A one-row batch holding `layers` ((1, H, n, D) keys and values per layer): a cached prefix."""
        cache = DynamicCache(config=model.config)
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            layer.update(keys, values)
        length = layers[0][0].shape[2]
        return cls(cache, torch.ones((1, length), dtype=torch.long, device=layers[0][0].device))

    def row_layers(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row `row`'s keys and values per layer, without its left padding: token i at column i (views)."""
        start = int((self.attention_mask[row] == 0).sum())
        return [
            (layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:])
            for layer in self.cache.layers
        ]

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and trim padding columns that every kept row has."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.attention_mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def extend(self, other: KVBatch) -> None:
        """Append `other`'s rows, left-padding whichever side is shorter. All or nothing: the new tensors are
        built first, so a failure (out of memory) leaves this batch as it was."""
        length = max(self.length, other.length)
        mask = torch.cat(
            [
                F.pad(self.attention_mask, (length - self.length, 0)),
                F.pad(other.attention_mask, (length - other.length, 0)),
            ]
        )
        merged = [
            (
                torch.cat([_pad_seq(mine.keys, length), _pad_seq(theirs.keys, length)]),
                torch.cat([_pad_seq(mine.values, length), _pad_seq(theirs.values, length)]),
            )
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        self.attention_mask = mask
        for layer, (keys, values) in zip(self.cache.layers, merged, strict=True):
            layer.keys, layer.values = keys, values


def _pad_seq(states: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad (B, H, T, D) states along T to `length`."""
    return F.pad(states, (0, 0, length - states.shape[2], 0))


def prefill(
    model, prompts: list[list[int]], pad_id: int, prefixes: list[torch.Tensor | None] | None = None
) -> tuple[KVBatch, torch.Tensor]:
    """Run the prompts (left-padded into one batch); return their KV batch and last-position logits (B, V).

    A row's `prefixes` entry (p-tuning's virtual tokens, (n, hidden)) goes in front of its prompt as
    embeddings, at positions 0..n-1, as peft places them; the prompt follows at n.
    """
    device = model.device
    prefixes = prefixes or [None] * len(prompts)
    lengths = [len(p) + (0 if e is None else e.shape[0]) for p, e in zip(prompts, prefixes, strict=True)]
    length = max(lengths)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (prompt, total) in enumerate(zip(prompts, lengths, strict=True)):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, length - total :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    inputs_embeds = None
    if any(e is not None for e in prefixes):
        with torch.inference_mode():
            inputs_embeds = model.get_input_embeddings()(input_ids)
            for row, (prefix, total) in enumerate(zip(prefixes, lengths, strict=True)):
                if prefix is not None:
                    start = length - total
                    inputs_embeds[row, start : start + prefix.shape[0]] = prefix.to(inputs_embeds.dtype)
    logits = _forward(model, input_ids, attention_mask, position_ids, cache, inputs_embeds)
    return KVBatch(cache, attention_mask), logits


def prefill_more(model, batch: KVBatch, tokens: list[int]) -> torch.Tensor:
    """Prefill the next chunk of a one-row batch's prompt (after a cached prefix or an earlier chunk);
    returns the logits of the chunk's last position (1, V)."""
    device = batch.attention_mask.device
    start = batch.length  # one row, no padding: its length is the next position
    input_ids = torch.tensor([tokens], dtype=torch.long, device=device)
    position_ids = torch.arange(start, start + len(tokens), device=device)[None, :]
    batch.attention_mask = F.pad(batch.attention_mask, (0, len(tokens)), value=1)
    return _forward(model, input_ids, batch.attention_mask, position_ids, batch.cache)


def decode(model, batch: KVBatch, last_tokens: list[int], positions: list[int]) -> torch.Tensor:
    """One decode step for every row; returns logits (B, V)."""
    device = batch.attention_mask.device
    input_ids = torch.tensor(last_tokens, dtype=torch.long, device=device)[:, None]
    position_ids = torch.tensor(positions, dtype=torch.long, device=device)[:, None]
    batch.attention_mask = F.pad(batch.attention_mask, (0, 1), value=1)
    return _forward(model, input_ids, batch.attention_mask, position_ids, batch.cache)


@torch.inference_mode()
def _forward(model, input_ids, attention_mask, position_ids, cache, inputs_embeds=None) -> torch.Tensor:
    out = model(
        input_ids=None if inputs_embeds is not None else input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]
