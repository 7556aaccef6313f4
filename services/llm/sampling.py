"""Choosing each row's next token, with each row's own parameters and random generator.

First each row's logits are adjusted as its request says: logit bias, the grammar's mask, no end before
min_new_tokens, the repetition penalty and OpenAI's presence and frequency penalties. Greedy rows then take
the argmax. Sampled rows go through temperature, min-p, top-k and top-p as batched tensor ops, then draw in
one batched inverse-CDF step: each row's own seeded `torch.Generator` gives one uniform number, so a
request's output depends on its seed, not on which other requests share the batch. Rows that ask for
log-probabilities get them from the adjusted, temperature-scaled distribution (before top-k/top-p, as
OpenAI reports them), for all of them at once. Nothing is read back per row: the step's device-to-host
copies are the tokens and, when some row asks, their log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.llm.grammar import Constraint, mask_logits
from services.llm.params import SamplingConfig


@dataclass
class RowSampler:
    """Per-sequence sampling state: its parameters, generator, and what its adjustments need to remember."""

    config: SamplingConfig
    generator: torch.Generator
    seen: torch.Tensor | None = None  # token ids of prompt + output, only kept for the repetition penalty
    seen_len: int = 0
    counts: torch.Tensor | None = None  # (V,) occurrences of each token in the output, for OpenAI's penalties
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, biases)
    end_ids: torch.Tensor | None = None  # tokens that would end the row, masked before min_new_tokens
    constraint: Constraint | None = None
    generated: int = 0

    @classmethod
    def create(
        cls,
        config: SamplingConfig,
        prompt_ids: list[int],
        device: torch.device,
        *,
        vocab_size: int = 0,
        end_ids: frozenset[int] | set[int] = frozenset(),
        constraint: Constraint | None = None,
    ) -> RowSampler:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
        row = cls(config, generator, constraint=constraint)
        if config.repetition_penalty != 1.0:
            row.seen = torch.empty(len(prompt_ids) + config.max_new_tokens, dtype=torch.long, device=device)
            row.seen[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
            row.seen_len = len(prompt_ids)
        if config.counts_output:
            row.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if config.logit_bias:
            ids, biases = zip(*config.logit_bias, strict=True)
            row.bias = (torch.tensor(ids, device=device), torch.tensor(biases, device=device))
        ends = sorted({*end_ids, *config.stop_token_ids})
        if config.min_new_tokens and ends:
            row.end_ids = torch.tensor(ends, dtype=torch.long, device=device)
        return row

    def observe(self, token_id: int) -> bool:
        """Record the token the row took; False when its grammar does not allow it."""
        self.generated += 1
        if self.seen is not None and self.seen_len < self.seen.numel():
            self.seen[self.seen_len] = token_id
            self.seen_len += 1
        if self.counts is not None:
            self.counts[token_id] += 1
        return self.constraint is None or self.constraint.accept(token_id)


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability and the row's likeliest alternatives (ids and log-probabilities)."""

    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class Picks:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None where the row did not ask


def adjust(logits: torch.Tensor, rows: list[RowSampler]) -> None:
    """Apply, in place, each row's bias, grammar, min_new_tokens and penalties to its logits (B, V)."""
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    for i, row in enumerate(rows):
        if row.bias is not None:
            ids, biases = row.bias
            logits[i].index_add_(0, ids, biases)
    if constrained:
        mask_logits(logits, constrained, [rows[i].constraint for i in constrained])
    for i, row in enumerate(rows):
        if row.end_ids is not None and row.generated < row.config.min_new_tokens:
            logits[i].index_fill_(0, row.end_ids, float("-inf"))
        if row.seen is not None:
            ids = row.seen[: row.seen_len]
            scores = logits[i].gather(0, ids)
            penalty = row.config.repetition_penalty
            logits[i].scatter_(0, ids, torch.where(scores < 0, scores * penalty, scores / penalty))
        if row.counts is not None:  # OpenAI's formula: frequency x count, plus presence once if seen
            config = row.config
            logits[i] -= row.counts * config.frequency_penalty + (row.counts > 0) * config.presence_penalty


def _filter(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor):
    """Mask sorted (descending) logits outside each row's min-p floor, top-k and top-p nucleus; keeps at
    least one token."""
    rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
    full = sorted_logits.softmax(-1)
    below_min = full < min_p[:, None] * full[:, :1]
    outside_k = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(below_min | outside_k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
    outside_p = mass_before >= top_p[:, None]
    outside_p[:, 0] = False
    return sorted_logits.masked_fill(outside_p, float("-inf"))


@torch.inference_mode()
def sample(logits: torch.Tensor, rows: list[RowSampler]) -> Picks:
    """Pick one token per row from `logits` of shape (B, V) (adjusted in place). Under `inference_mode`, like
    the forward that made them: its logits are inference tensors, which only that mode may change in place."""
    logits = logits.float()
    adjust(logits, rows)
    chosen = logits.argmax(-1)
    sampled = [i for i, row in enumerate(rows) if not row.config.greedy]
    if sampled:
        _draw(logits, rows, sampled, chosen)
    asking = [i for i, row in enumerate(rows) if row.config.logprobs]
    logprobs = _logprobs(logits, rows, asking, chosen) if asking else {}
    return Picks(chosen.tolist(), [logprobs.get(i) for i in range(len(rows))])


def _draw(logits: torch.Tensor, rows: list[RowSampler], sampled: list[int], chosen: torch.Tensor) -> None:
    """Replace `chosen` of the sampled rows by their draws."""
    device = logits.device
    index = torch.tensor(sampled, device=device)
    configs = [rows[i].config for i in sampled]
    temperature = torch.tensor([c.temperature for c in configs], device=device)
    scaled = logits.index_select(0, index) / temperature[:, None]  # (S, V)
    order = None
    if any(c.top_k > 0 or c.top_p < 1.0 or c.min_p > 0.0 for c in configs):
        scaled, order = scaled.sort(dim=-1, descending=True)
        top_k = torch.tensor([c.top_k for c in configs], device=device)
        top_p = torch.tensor([c.top_p for c in configs], device=device)
        min_p = torch.tensor([c.min_p for c in configs], device=device)
        scaled = _filter(scaled, top_k, top_p, min_p)
    probs = scaled.softmax(-1)
    uniform = torch.cat([torch.rand(1, generator=rows[i].generator, device=device) for i in sampled])
    picks = _inverse_cdf(probs, uniform)
    if order is not None:
        picks = order.gather(1, picks[:, None])[:, 0]
    # overflowed logits (extreme parameters) leave no distribution: those rows fall back to greedy
    usable = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
    chosen[index] = torch.where(usable, picks, chosen[index])


def _logprobs(
    logits: torch.Tensor, rows: list[RowSampler], asking: list[int], chosen: torch.Tensor
) -> dict[int, TokenLogprobs]:
    """Log-probabilities of the chosen tokens and the top alternatives of the rows in `asking`, batched."""
    device = logits.device
    index = torch.tensor(asking, device=device)
    temperature = torch.tensor([rows[i].config.temperature or 1.0 for i in asking], device=device)
    logp = (logits.index_select(0, index) / temperature[:, None]).log_softmax(-1)
    picked = logp.gather(1, chosen.index_select(0, index)[:, None])[:, 0]
    k = max(rows[i].config.top_logprobs for i in asking)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    picked, top_values, top_ids = picked.tolist(), top_values.tolist(), top_ids.tolist()
    out = {}
    for n, i in enumerate(asking):
        want = rows[i].config.top_logprobs
        out[i] = TokenLogprobs(picked[n], top_ids[n][:want], top_values[n][:want])
    return out


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds its uniform draw (S,); zero-probability
    tokens are never picked."""
    cdf = probs.cumsum(-1)
    target = (uniform * cdf[:, -1]).clamp(max=cdf[:, -1].nextafter(torch.zeros_like(uniform)))
    picks = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return picks.clamp(max=probs.shape[-1] - 1)
