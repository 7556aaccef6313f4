"""The batched draw: each row samples its own distribution with its own seed, whatever shares the batch.

Seeds are fixed, so every figure here is the same on every run: the frequency checks are deterministic,
with tolerances far wider than the sampling error of 4,000 draws (about 0.007).
"""

from __future__ import annotations

import math

import torch

from services.llm.params import SamplingConfig
from services.llm.sampling import RowSampler, next_tokens

CPU = torch.device("cpu")
PROBS = [0.6, 0.25, 0.1, 0.05, 0.0]


def sampler(seed: int, **config) -> RowSampler:
    return RowSampler.create(SamplingConfig(max_new_tokens=1, temperature=1.0, seed=seed, **config), [0], CPU)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs])


def frequencies(picks: list[int], vocab: int) -> list[float]:
    return [picks.count(t) / len(picks) for t in range(vocab)]


def test_draws_follow_the_rows_distribution_and_never_pick_a_zero_probability_token():
    logits = logits_of(PROBS)[None].repeat(4000, 1)
    picks = next_tokens(logits, [sampler(seed) for seed in range(4000)])
    observed = frequencies(picks, len(PROBS))
    assert observed[4] == 0
    for expected, seen in zip(PROBS, observed, strict=True):
        assert abs(seen - expected) < 0.03, (observed, PROBS)


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = logits_of(PROBS)[None].repeat(2000, 1)
    top_k = frequencies(next_tokens(logits, [sampler(s, top_k=2) for s in range(2000)]), len(PROBS))
    assert top_k[2:] == [0, 0, 0] and abs(top_k[0] - 0.6 / 0.85) < 0.04
    top_p = frequencies(next_tokens(logits, [sampler(s, top_p=0.5) for s in range(2000)]), len(PROBS))
    assert top_p[0] == 1.0, "the first token alone reaches top_p"


def test_a_rows_draw_depends_on_its_seed_not_on_its_neighbours():
    vocab = 50
    torch.manual_seed(0)
    mine = torch.randn(vocab)
    alone = [next_tokens(mine[None], [sampler(seed)])[0] for seed in range(200)]
    for seed in range(200):
        neighbours = torch.randn(3, vocab)
        batch = torch.stack([neighbours[0], mine, neighbours[1], neighbours[2]])
        rows = [sampler(1000 + seed), sampler(seed), RowSampler.create(SamplingConfig(1), [0], CPU), sampler(7)]
        assert next_tokens(batch, rows)[1] == alone[seed]
    assert len(set(alone)) > 5, "different seeds draw different tokens"


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    greedy = RowSampler.create(SamplingConfig(max_new_tokens=1), [0], CPU)
    assert next_tokens(logits, [greedy, sampler(3)])[0] == 1
    assert next_tokens(logits[1:], [RowSampler.create(SamplingConfig(max_new_tokens=1), [0], CPU)]) == [0]
