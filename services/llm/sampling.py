"""Choosing each row's next token, with each row's own parameters and random generator.

Greedy rows take the argmax. Sampled rows go through repetition penalty, temperature, top-k and
top-p as batched tensor ops, then draw in one batched inverse-CDF step: each row's own seeded
`torch.Generator` gives one uniform number, so a request's output depends on its seed, not on which
other requests share the batch. Nothing is read back per row: the step's one device-to-host copy is
the final list of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.llm.params import SamplingConfig


@dataclass
class RowSampler:
    """Per-sequence sampling state: its parameters, generator, and (for the penalty) the tokens seen."""

    config: SamplingConfig
    generator: torch.Generator
    seen: torch.Tensor | None = None  # token ids of prompt + output, only kept when a penalty is set
    seen_len: int = 0

    @classmethod
    def create(cls, config: SamplingConfig, prompt_ids: list[int], device: torch.device) -> RowSampler:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
        row = cls(config, generator)
        if config.repetition_penalty != 1.0:
            row.seen = torch.empty(len(prompt_ids) + config.max_new_tokens, dtype=torch.long, device=device)
            row.seen[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
            row.seen_len = len(prompt_ids)
        return row

    def observe(self, token_id: int) -> None:
        if self.seen is not None and self.seen_len < self.seen.numel():
            self.seen[self.seen_len] = token_id
            self.seen_len += 1


def apply_repetition_penalty(logits: torch.Tensor, rows: list[RowSampler]) -> None:
    """CTRL-style penalty (as in transformers): divide positive, multiply negative logits of seen tokens."""
    for i, row in enumerate(rows):
        if row.seen is None:
            continue
        ids = row.seen[: row.seen_len]
        scores = logits[i].gather(0, ids)
        penalty = row.config.repetition_penalty
        logits[i].scatter_(0, ids, torch.where(scores < 0, scores * penalty, scores / penalty))


def _filter_top_k_top_p(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask sorted (descending) logits outside each row's top-k and top-p nucleus; keeps at least one."""
    rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
    outside_k = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
    outside_p = mass_before >= top_p[:, None]
    outside_p[:, 0] = False
    return sorted_logits.masked_fill(outside_p, float("-inf"))


def next_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Pick one token per row from `logits` of shape (B, V)."""
    logits = logits.float()
    if any(row.seen is not None for row in rows):
        apply_repetition_penalty(logits, rows)
    chosen = logits.argmax(-1)
    sampled = [i for i, row in enumerate(rows) if not row.config.greedy]
    if sampled:
        device = logits.device
        index = torch.tensor(sampled, device=device)
        configs = [rows[i].config for i in sampled]
        temperature = torch.tensor([c.temperature for c in configs], device=device)
        scaled = logits.index_select(0, index) / temperature[:, None]  # (S, V)
        order = None
        if any(c.top_k > 0 or c.top_p < 1.0 for c in configs):
            scaled, order = scaled.sort(dim=-1, descending=True)
            top_k = torch.tensor([c.top_k for c in configs], device=device)
            top_p = torch.tensor([c.top_p for c in configs], device=device)
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(-1)
        uniform = torch.cat([torch.rand(1, generator=rows[i].generator, device=device) for i in sampled])
        picks = _inverse_cdf(probs, uniform)
        if order is not None:
            picks = order.gather(1, picks[:, None])[:, 0]
        # overflowed logits (extreme parameters) leave no distribution: those rows fall back to greedy
        usable = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
        chosen[index] = torch.where(usable, picks, chosen[index])
    return chosen.tolist()


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds its uniform draw (S,); zero-probability
    tokens are never picked."""
    cdf = probs.cumsum(-1)
    target = (uniform * cdf[:, -1]).clamp(max=cdf[:, -1].nextafter(torch.zeros_like(uniform)))
    picks = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return picks.clamp(max=probs.shape[-1] - 1)
