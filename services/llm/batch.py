"""One packed forward of the engine: decode tokens and prefill chunks of many sequences as one (1, N) row.

The caller says, per sequence, which slot of the `SlotKV` it owns, where its tokens start and what they
are; `forward` builds the packed input (ids, positions, and embeddings where a p-tuning adapter puts
virtual tokens), runs the model with a `StepPlan` for `slot_attention`, and returns the logits of the
positions asked for. See `slot_attention` for why one packed row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.llm import slot_attention
from services.llm.kv_slots import Slot, SlotKV
from services.llm.slot_attention import Segment, StepPlan
from shared.quantization import activation_dtype


def check_cache_support(model) -> None:
    """Refuse, at load time, models whose attention the slot cache cannot hold (e.g. sliding windows)."""
    for layer in DynamicCache(config=model.config).layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"continuous batching supports full-attention KV caches only, not {type(layer).__name__}"
            )


@dataclass
class Work:
    """One sequence's tokens in a step: `tokens` at positions start.. of `slot`. `prefix` (p-tuning's
    virtual-token embeddings, (v, hidden)) replaces the embeddings of the first v tokens (placeholders)."""

    slot: Slot
    start: int
    tokens: list[int]
    logits: bool = True  # return the logits of its last token
    prefix: torch.Tensor | None = None


def forward(model, kv: SlotKV, decode: list[Work], prefill: list[Work]) -> torch.Tensor:
    """Run every sequence's tokens in one forward; returns the logits (R, V) of the works that ask, decode
    works first. `decode` holds one-token works in ascending slot order; `prefill` the prompt chunks."""
    assert all(len(w.tokens) == 1 and w.prefix is None for w in decode)
    assert [w.slot for w in decode] == sorted(w.slot for w in decode)
    work = [*decode, *prefill]
    device = kv.device
    plan = StepPlan.build(
        kv,
        [Segment(w.slot, w.start, 1) for w in decode],
        [Segment(w.slot, w.start, len(w.tokens)) for w in prefill],
    )
    ids = [t for w in work for t in w.tokens]
    positions = [w.start + i for w in work for i in range(len(w.tokens))]
    ends, last = [], 0
    for w in work:
        last += len(w.tokens)
        if w.logits:
            ends.append(last - 1)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)
    keep = torch.tensor(ends, dtype=torch.long, device=device)
    with torch.inference_mode(), attention_backends():
        embeds = None
        if any(w.prefix is not None for w in work):
            embeds = model.get_input_embeddings()(input_ids)
            offset = 0
            for w in work:
                if w.prefix is not None:
                    embeds[0, offset : offset + w.prefix.shape[0]] = w.prefix.to(embeds.dtype)
                offset += len(w.tokens)
        out = model(
            input_ids=None if embeds is not None else input_ids,
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=no_mask(device),
            use_cache=False,
            logits_to_keep=keep,
            step=plan,
        )
    return out.logits[0]


def attention_backends():
    """SDPA without cuDNN attention: cuDNN builds an execution plan per new shape, milliseconds of host time
    on every step here, where the attended length grows by one a step (seen on an H200, torch 2.11)."""
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def no_mask(device: torch.device) -> torch.Tensor:
    """A placeholder 4D mask: transformers passes a 4D mask through as it is instead of building a causal
    mask for the packed row, which the step's attention would ignore anyway."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


def prefill_logits(model, prompts: list[list[int]], prefixes: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Prefill several prompts in one packed forward, as the engine does, into a cache of their own; returns
    each one's last-position logits (B, V). A `prefixes` entry (p-tuning's virtual tokens, (v, hidden)) goes
    in front of its prompt at positions 0..v-1, as peft places them."""
    use_slot_attention(model)
    prefixes = prefixes or [None] * len(prompts)
    lengths = [len(p) + (0 if e is None else e.shape[0]) for p, e in zip(prompts, prefixes, strict=True)]
    kv = SlotKV(
        model.config,
        dtype=activation_dtype(model),
        device=model.device,
        budget_bytes=2**62,
        max_rows=len(prompts),
    )
    work = []
    for prompt, prefix, length in zip(prompts, prefixes, lengths, strict=True):
        virtual = [] if prefix is None else [0] * prefix.shape[0]
        work.append(Work(kv.reserve(length), 0, [*virtual, *prompt], prefix=prefix))
    kv.ensure()
    return forward(model, kv, [], work)


def use_slot_attention(model) -> None:
    """Route the model's attention through the slot cache (idempotent)."""
    slot_attention.install(model)
