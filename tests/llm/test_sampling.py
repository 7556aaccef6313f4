"""The batched draw: each row samples its own distribution with its own seed, whatever shares the batch.

Seeds are fixed, so every figure here is the same on every run: the frequency checks are deterministic,
with tolerances far wider than the sampling error of 4,000 draws (about 0.007).
"""

from __future__ import annotations

import math

import torch

from services.llm.params import SamplingConfig
from services.llm.sampling import RowSampler, sample

CPU = torch.device("cpu")
PROBS = [0.6, 0.25, 0.1, 0.05, 0.0]


def next_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    return sample(logits, rows).tokens


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


def greedy_row(**config) -> RowSampler:
    return RowSampler.create(SamplingConfig(max_new_tokens=8, **config), [0], CPU, vocab_size=5, end_ids={4})


def test_openai_penalties_and_logit_bias_change_the_logits_exactly_as_their_formulas_say():
    from services.llm.sampling import adjust

    row = greedy_row(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, -3.0), (3, 2.0)))
    for token in (1, 1, 2):
        row.observe(token)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    adjust(logits, [row])
    # token 0: bias -3; 1: seen twice (2 x 0.25 + 0.5); 2: once (0.25 + 0.5); 3: bias +2; 4: untouched
    assert logits[0].tolist() == [1.0 - 3.0, 2.0 - 1.0, 3.0 - 0.75, 4.0 + 2.0, 5.0]


def test_min_new_tokens_holds_back_end_tokens_until_reached():
    row = greedy_row(min_new_tokens=2, stop_token_ids=frozenset({3}))
    logits = torch.tensor([[0.0, 1.0, 2.0, 8.0, 9.0]])
    assert next_tokens(logits.clone(), [row]) == [2], "EOS (4) and the stop token (3) are masked"
    row.observe(2)
    assert next_tokens(logits.clone(), [row]) == [2]
    row.observe(2)
    assert next_tokens(logits.clone(), [row]) == [4], "two tokens in: the end token may come"


def test_min_p_drops_tokens_below_its_share_of_the_likeliest():
    logits = logits_of(PROBS)[None].repeat(2000, 1)
    picks = frequencies(next_tokens(logits, [sampler(s, min_p=0.3) for s in range(2000)]), len(PROBS))
    assert picks[2:] == [0, 0, 0], "0.1 and 0.05 are under 0.3 x 0.6"
    assert abs(picks[0] - 0.6 / 0.85) < 0.04


def test_logprobs_are_of_the_scaled_adjusted_distribution_before_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    row = RowSampler.create(
        SamplingConfig(max_new_tokens=1, temperature=2.0, top_k=1, logprobs=True, top_logprobs=3, seed=1), [0], CPU
    )
    picks = sample(logits.clone(), [row])
    expected = (logits[0] / 2.0).log_softmax(-1)
    (got,) = picks.logprobs
    assert picks.tokens == [0], "top_k=1 leaves only the likeliest"
    assert math.isclose(got.logprob, expected[0].item(), rel_tol=1e-6), "top-k does not renormalize logprobs"
    assert got.top_ids == [0, 1, 2]
    assert got.top_logprobs == sorted(got.top_logprobs, reverse=True)
    assert all(
        math.isclose(a, expected[i].item(), rel_tol=1e-6) for a, i in zip(got.top_logprobs, [0, 1, 2], strict=True)
    )


def test_rows_that_do_not_ask_get_no_logprobs_and_each_gets_its_own_count():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [
        RowSampler.create(SamplingConfig(max_new_tokens=1, logprobs=True), [0], CPU),
        RowSampler.create(SamplingConfig(max_new_tokens=1), [0], CPU),
        RowSampler.create(SamplingConfig(max_new_tokens=1, logprobs=True, top_logprobs=5), [0], CPU),
    ]
    picks = sample(logits.clone(), rows)
    assert picks.logprobs[1] is None
    assert picks.logprobs[0].top_ids == [] and len(picks.logprobs[2].top_ids) == 5
    assert picks.logprobs[2].top_ids[0] == picks.tokens[2], "greedy takes the likeliest"
    assert math.isclose(picks.logprobs[0].logprob, logits[0].log_softmax(-1).max().item(), rel_tol=1e-6)


def test_logits_from_the_engines_inference_mode_forward_take_every_adjustment():
    """The engine's forward runs under `inference_mode`, so its logits are inference tensors: adjusting them in
    place (min_new_tokens, biases, penalties) must work on those too (it once failed with INTERNAL)."""
    row = greedy_row(
        min_new_tokens=2, stop_token_ids=frozenset({3}), repetition_penalty=1.5, presence_penalty=0.5,
        logit_bias=((0, -3.0),),
    )  # fmt: skip
    row.observe(1)
    with torch.inference_mode():
        logits = torch.tensor([[0.0, 1.0, 2.0, 8.0, 9.0]])
    assert next_tokens(logits, [row]) == [2], "EOS (4) and the stop token (3) are masked"
