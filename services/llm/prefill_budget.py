"""How many prompt tokens one engine step may prefill while other sequences are decoding.

A prompt prefilled in one piece stalls every running stream for the whole prompt (seconds for a long one
on a CPU). Chunked prefill bounds that stall; the chunk size that bounds it depends on the hardware, the
model and the batch. So the budget is measured, not guessed: the engine reports how long its steps take,
with how many decode rows and prompt tokens, and a step's chunk gets about `STALL_FRACTION` of a decode
step's time. The chunk rides in the same forward as the decode tokens, so a running stream then waits
about 1.35 decode steps between tokens at most. The fraction is a third rather than a half because a
chunk's tokens cost more than the average measured as the prompt grows (each attends to all before it).

A token's cost is learnt only from steps that decoded too (what a chunk adds to a decode step), and it is
not linear: on a GPU a few dozen extra tokens cost nothing, a few thousand cost a lot. So a chunk may at
most double the previous one (a slow start, re-measured at every size), and a step that cost more per
token than the average takes over at once, while cheaper ones pull the average down slowly.

Short prompts (up to SHORT_PROMPT_TOKENS) are exempt: they are prefilled whole, together, up to
BURST_TOKENS a step. `fixed` (llm.max_prefill_tokens set) replaces the measured budget with that many
tokens.
"""

from __future__ import annotations

STALL_FRACTION = 0.35  # a chunk's time, as a fraction of one decode step's
MIN_TOKENS = 8  # a chunk never shrinks below this: a long prompt still makes progress
SMOOTHING = 0.2  # weight of the newest measurement in the running averages
# Short prompts are not chunked: below a few dozen tokens a forward's cost is mostly reading the weights,
# so splitting one saves the running streams nothing, and holding them back would only delay a burst of
# chat requests joining the batch. They are prefilled whole, together, up to BURST_TOKENS a step.
SHORT_PROMPT_TOKENS = 64
BURST_TOKENS = 512


class PrefillBudget:
    def __init__(self, max_tokens: int, fixed: int | None = None):
        self.max_tokens = max_tokens  # a step never prefills more (the longest prompt accepted)
        self.fixed = fixed
        self.decode_s: float | None = None  # one decode step
        self.token_s: float | None = None  # what one prefilled token adds to a decode step
        self.last_chunk: int | None = None  # tokens prefilled by the last step that also decoded

    def observe_step(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        """A step's time: a decode step's cost when it prefilled nothing, a prompt token's added cost when it
        did both."""
        if not decode_rows:
            return  # a prefill alone: nobody waited on it, and its per-token cost is mostly overhead
        if not prefill_tokens:
            self.decode_s = _average(self.decode_s, seconds)
            return
        self.last_chunk = prefill_tokens
        if self.decode_s is None or seconds <= self.decode_s:
            return  # the chunk cost nothing measurable: the next may double
        latest = (seconds - self.decode_s) / prefill_tokens
        self.token_s = latest if self.token_s is None or latest > self.token_s else _average(self.token_s, latest)

    def tokens(self, decoding: bool) -> int:
        """This step's prefill budget: everything when no stream waits on it, else a chunk."""
        if not decoding:
            return self.max_tokens
        if self.fixed is not None:
            return self.fixed
        budget = 2 * self.last_chunk if self.last_chunk else MIN_TOKENS
        if self.decode_s is not None and self.token_s is not None:
            budget = min(budget, int(STALL_FRACTION * self.decode_s / self.token_s))
        return max(MIN_TOKENS, min(self.max_tokens, budget))


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value
