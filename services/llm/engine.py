"""The continuous-batching engine: one thread that owns the model and runs all sequences together.

Each loop iteration: drop cancelled and expired sequences, admit waiting ones while the batch has room and
their KV fits the cache budget, then run one packed forward that carries a decode token for every running
sequence and this step's prompt chunks, hand each sequence its new text, and free the finished. Sequences
join and leave at every step, each with its own sampling parameters, seed and LoRA adapter, and its own
slot of the KV cache (`SlotKV`), so joining and leaving copy nobody's KV. No gRPC here: callers get events
through a callback.

Prefill: admitted prompts wait in `_prefilling` until their KV is complete. A prompt whose leading blocks
are in the prefix cache starts from that KV. Short prompts go in whole; longer ones a chunk per step
(`PrefillBudget`), in the same forward as the decode tokens, so a long prompt delays the running streams by
about a chunk's share of one step, never by the whole prompt. A sequence gets its first token from the
step that completes its prompt and joins the decoding rows. The prompt's full blocks go into the prefix
cache as its chunks complete.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.llm import metrics
from services.llm.adapters import AdapterKey, LoraAdapterCache
from services.llm.batch import Work, forward, use_slot_attention
from services.llm.cuda_graphs import StaticDecode
from services.llm.detokenizer import IncrementalDetokenizer
from services.llm.grammar import Constraint
from services.llm.kv_slots import Slot, SlotKV, default_budget_bytes
from services.llm.params import SamplingConfig
from services.llm.prefill_budget import BURST_TOKENS, SHORT_PROMPT_TOKENS, PrefillBudget
from services.llm.prefix_cache import PrefixCache
from services.llm.sampling import Picks, RowSampler, TokenLogprobs, sample
from services.llm.stop import StopStringMatcher
from shared.devices import is_fatal_device_error
from shared.engine_thread import EngineThread
from shared.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError
from shared.quantization import activation_dtype
from shared.waiting import WaitingQueue

log = logging.getLogger(__name__)

WARM_UP_TOKENS = 16  # the warm-up step's prompt chunk


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


@dataclass(frozen=True)
class GenerationEvent:
    """New text of one sequence; the last event has `finish_reason` (or `error`) and the usage."""

    text: str
    finish_reason: FinishReason | None = None
    error: ServiceError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int = 0  # the sampling seed, on the last event: sent back so clients can reproduce
    logprobs: tuple[GeneratedLogprob, ...] = ()  # of the tokens generated since the previous event

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class GeneratedLogprob:
    """A generated token, its log-probability and the likeliest alternatives ((id, log-probability), ...)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    @classmethod
    def of(cls, token_id: int, picked: TokenLogprobs) -> GeneratedLogprob:
        return cls(token_id, picked.logprob, tuple(zip(picked.top_ids, picked.top_logprobs, strict=True)))


_ids = itertools.count()


class Sequence:
    """One generation request as the engine tracks it. `cancel()` may be called from any thread."""

    def __init__(
        self,
        prompt_ids: list[int],
        config: SamplingConfig,
        on_event: Callable[[GenerationEvent], None],
        adapter: str | None = None,
        deadline: float | None = None,  # time.monotonic() value
        adapter_version: str | None = None,  # the version the request resolved; None: the current one
        grammar=None,  # an xgrammar CompiledGrammar the output must follow (`grammar.py`)
    ):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.config = config
        self.adapter = adapter
        self.adapter_version = adapter_version
        self.deadline = deadline
        self.grammar = grammar
        self.on_event = on_event
        self.pending_logprobs: list[GeneratedLogprob] = []  # sent with the next event
        self.output_ids: list[int] = []
        self.cancelled = False
        self.finished = False
        self.arrival = time.perf_counter()
        self.last_token_at: float | None = None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.stop_matcher = StopStringMatcher(config.stop)
        self.sampler: RowSampler | None = None
        self.adapter_key: AdapterKey | None = None  # the adapter version it runs on, pinned while it runs
        self.virtual_tokens = 0  # a p-tuning adapter's embeddings before the prompt
        self.slot: Slot | None = None  # its row of the KV cache, from admission to the end
        self.prefilled = 0  # virtual and prompt tokens whose KV exists
        self.cached = 0  # of which came from the prefix cache
        self.in_prefix_cache = 0  # leading prompt tokens whose blocks are in the prefix cache

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_cost(self) -> int:
        """Positions the prefill fills: the virtual tokens, then the prompt."""
        return self.virtual_tokens + len(self.prompt_ids)

    @property
    def reserved_tokens(self) -> int:
        """KV positions it may fill: the prompt, then every new token."""
        return self.prompt_cost + self.config.max_new_tokens

    @property
    def position(self) -> int:
        """Position id of the newest token (the next decode input)."""
        return self.virtual_tokens + len(self.prompt_ids) + len(self.output_ids) - 1


class LLMEngine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str,
        eos_token_ids: set[int],
        max_batch_size: int,
        max_waiting: int,
        max_prompt_tokens: int,
        max_prefill_tokens: int | None = None,
        adapters: LoraAdapterCache | None = None,
        prefix_cache: PrefixCache | None = None,
        kv_cache_bytes: int | None = None,
        cuda_graphs: bool = False,
    ):
        """`cuda_graphs`: decode-only steps of base-model rows replay CUDA graphs (`cuda_graphs.py`); on a
        CPU the same static plans run without capture (what the tests check)."""
        use_slot_attention(model)
        self._model = model
        self._tokenizer = tokenizer
        self.model_name = model_name
        self._eos = eos_token_ids
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._max_batch = max_batch_size
        self._max_prompt_tokens = max_prompt_tokens
        self.prefill_budget = PrefillBudget(max_prompt_tokens, fixed=max_prefill_tokens)
        self.prefix_cache = prefix_cache
        self.adapters = adapters
        self._metrics = metrics.ModelMetrics(model_name)
        self._waiting: WaitingQueue[Sequence] = WaitingQueue(
            model_name, max_waiting, metrics.REQUESTS_WAITING.labels(model_name).set
        )
        self.kv = SlotKV(
            model.config,
            dtype=activation_dtype(model),
            device=model.device,
            budget_bytes=kv_cache_bytes if kv_cache_bytes is not None else default_budget_bytes(model.device),
            max_rows=max_batch_size,
            static_buffers=cuda_graphs,
        )
        if adapters is not None:
            adapters.share_budget(self.kv)
        self._graphs: StaticDecode | None = None
        if cuda_graphs:
            self._graphs = StaticDecode(model, self.kv, capture=model.device.type == "cuda")
        self._metrics.kv_cache_budget_bytes.set(self.kv.budget_bytes)
        self._running: list[Sequence] = []  # decoding, in ascending slot order
        self._prefilling: list[Sequence] = []  # taken from the queue, prompt KV not complete yet
        self._thread = EngineThread(f"engine-{model_name}", self._waiting, self._loop, self._fail_all)

    # -- called from other threads ------------------------------------------------------------------

    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        self.warm_up()
        self._thread.start(on_death)

    def warm_up(self) -> None:
        """One packed step on scratch rows before the first request: two decode rows at different lengths
        and a prompt chunk, then a greedy and a sampled pick. The first use of each kernel is slow on a GPU
        (CUDA loads kernels lazily; cuBLAS picks algorithms per shape): on an H200 the first step that
        carried a chunk took 91 ms against 32 ms decode steps, a stall of every running stream, and a cost
        the prefill budget then learnt from. Paid here, it is paid before the service reports SERVING. The
        rows are freed afterwards, and nothing is measured, counted or cached. Skipped when the KV budget
        cannot hold the rows."""
        slots = []
        for _ in range(3):
            if not self.kv.fits(WARM_UP_TOKENS):
                break
            slots.append(self.kv.reserve(WARM_UP_TOKENS))
        try:
            if len(slots) < 3:
                log.info("KV budget too small for the warm-up step; skipped", extra={"model": self.model_name})
                return
            self.kv.ensure()
            if self.adapters is not None:
                self.adapters.set_rows([None] * (2 + WARM_UP_TOKENS), packed=True)
            decode = [Work(slots[0], 0, [self._pad_id]), Work(slots[1], 1, [self._pad_id])]
            chunk = Work(slots[2], 0, [self._pad_id] * WARM_UP_TOKENS)
            logits = forward(self._model, self.kv, decode, [chunk])
            greedy, sampled = SamplingConfig(max_new_tokens=1), SamplingConfig(max_new_tokens=1, temperature=1.0)
            sample(
                logits, [RowSampler.create(c, [self._pad_id], self._model.device) for c in (greedy, sampled, sampled)]
            )
        finally:
            for slot in slots:
                self.kv.free(slot)

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`: the one place a request is checked against this engine. A prompt past the limit is
        INVALID_ARGUMENT; one whose KV could never fit the cache, or a full queue, RESOURCE_EXHAUSTED."""
        if seq.prompt_cost > self._max_prompt_tokens:
            raise prompt_too_long(seq.prompt_cost, self._max_prompt_tokens)
        if seq.reserved_tokens > self.kv.max_tokens_alone:
            raise self.kv_too_small(seq.prompt_cost, seq.config.max_new_tokens)
        self._waiting.put(seq)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; sequences still waiting or running end with UNAVAILABLE."""
        self._thread.stop(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.alive

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences past the queue: decoding, or with their prompt being prefilled."""
        return len(self._running) + len(self._prefilling)

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        waiting = self._waiting
        while True:
            with waiting.cond:
                while not waiting.closed and not waiting.items and not self._running and not self._prefilling:
                    waiting.cond.wait()
                if waiting.closed:
                    return
            self._step()

    def _step(self) -> None:
        """Admit, then run one packed forward of decode tokens and prompt chunks. A failure fails only the
        sequences it belongs to: when a step with prompt chunks fails, the decode rows are run again alone
        and the prefilling sequences fail. A fatal device error ends the loop (and the process), since every
        later step would fail too."""
        self._drop_abandoned()
        self._admit()
        plan = self._plan_prefill()
        decoding = list(self._running)
        if not plan and not decoding:
            return
        try:
            self._forward(decoding, plan)
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise
            if not (plan and decoding):
                self._fail([*decoding, *(seq for seq, _ in plan)], exc)
                return
            self._fail([seq for seq, _ in plan], exc)
            try:  # the decode rows alone: rewriting their columns with the same KV is harmless
                self._forward(decoding, [])
            except Exception as again:
                if is_fatal_device_error(again):
                    raise
                self._fail(decoding, again)

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            log.warning("out of device memory", extra={"model": self.model_name, "sequences": len(seqs)})
            _release_cached_memory(self._model.device)
            error: ServiceError = ResourceExhausted(
                "the server ran out of accelerator memory for this request; retry with a shorter prompt "
                "or fewer new tokens"
            )
        else:
            log.error(
                "engine step failed",
                exc_info=exc,
                extra={"model": self.model_name, "sequences": len(seqs)},
            )
            error = ServiceError("the engine hit an internal error; the server logged it")
        for seq in seqs:
            self._finish(seq, error=error)
        self._remove_finished()

    def _admit(self) -> None:
        """Take waiting sequences, first come first served, while the batch has room and their KV fits the
        cache budget next to the running ones; each gets a slot and starts its prefill (from the prefix cache
        where its prompt's first blocks are there). A sequence that could never fit is refused."""
        taken: list[Sequence] = []
        unfit: list[tuple[Sequence, ServiceError | None]] = []
        waiting = self._waiting
        with waiting.cond:
            while waiting.items and self.num_running + len(taken) < self._max_batch:
                seq = waiting.items[0]
                if seq.cancelled:
                    unfit.append((waiting.items.popleft(), None))
                elif seq.reserved_tokens > self.kv.max_tokens_alone:  # LoRA slots took budget since submit
                    error = self.kv_too_small(seq.prompt_cost, seq.config.max_new_tokens)
                    unfit.append((waiting.items.popleft(), error))
                elif self.kv.fits(seq.reserved_tokens):
                    seq.slot = self.kv.reserve(seq.reserved_tokens)
                    taken.append(waiting.items.popleft())
                else:
                    break  # the head waits until finished sequences make room: nothing overtakes it
            if taken:  # counted as running before they leave the waiting count: never in neither gauge
                self._metrics.requests_running.set(self.num_running + len(taken))
            waiting.publish()
        for seq, error in unfit:
            if error is not None:
                self._finish(seq, error=error)
        if not taken:
            return
        try:
            self.kv.ensure()
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise
            for seq in taken:
                self._release_slot(seq)
            self._fail(taken, exc)
            return
        for seq in taken:
            if seq.adapter and self.adapters is not None:
                try:
                    seq.adapter_key = self.adapters.acquire(seq.adapter, seq.adapter_version)
                except Exception as exc:  # this request's adapter, not the batch's problem
                    if is_fatal_device_error(exc):
                        raise
                    if not isinstance(exc, ServiceError):
                        log.exception("adapter load failed", extra={"adapter": seq.adapter})
                        exc = ServiceError(f"adapter {seq.adapter!r} could not be loaded; the server logged why")
                    self._finish(seq, error=exc)
                    self._release_slot(seq)
                    continue
            self._start_prefill(seq)
            self._prefilling.append(seq)
        self._metrics.requests_running.set(self.num_running)
        self._metrics.kv_cache_bytes.set(self.kv.nbytes)

    def kv_too_small(self, prompt_tokens: int, max_new_tokens: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) need KV cache for "
            f"{prompt_tokens + max_new_tokens} tokens; this server's KV cache budget (llm.kv_cache_bytes, "
            f"{self.kv.budget_bytes // 2**20} MiB) holds at most {self.kv.max_tokens_alone} tokens for one "
            "request; ask for fewer new tokens or send a shorter prompt"
        )

    def _start_prefill(self, seq: Sequence) -> None:
        prefix = self.adapters.prefix(seq.adapter_key) if self.adapters is not None else None
        seq.virtual_tokens = 0 if prefix is None else prefix.shape[0]
        if prefix is not None or self.prefix_cache is None or not self.prefix_cache.enabled:
            return  # virtual tokens shift every position: their KV is this request's own
        try:
            cached, blocks = self.prefix_cache.lookup(seq.adapter_key, seq.prompt_ids)
            for i, layers in enumerate(blocks):
                self.kv.write(seq.slot, i * self.prefix_cache.block_tokens, layers)
            seq.prefilled = seq.cached = seq.in_prefix_cache = cached
        except Exception as exc:  # the cache only saves work: without it the prompt is prefilled in full
            if is_fatal_device_error(exc):
                raise
            log.warning("prefix cache lookup failed; prefilling in full", exc_info=True)
            seq.prefilled, seq.cached, cached = 0, 0, 0
        self._metrics.prefix_cache_queries.inc(len(seq.prompt_ids))
        self._metrics.prefix_cache_hits.inc(cached)

    def _plan_prefill(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens) to prefill this step: short prompts (and short rests after a cached prefix) whole,
        up to a burst; the others first come first served within the step's budget."""
        decoding = bool(self._running)
        budget = self.prefill_budget.tokens(decoding)
        burst = BURST_TOKENS if decoding else 0  # with nothing decoding the budget takes everything anyway
        plan = []
        for seq in self._prefilling:
            remaining = seq.prompt_cost - seq.prefilled
            untouched = seq.prefilled == seq.cached  # a short prompt, or a short rest after its cached prefix
            if untouched and remaining <= min(SHORT_PROMPT_TOKENS, burst):
                plan.append((seq, remaining))
                burst -= remaining
                continue
            if budget <= 0:
                continue
            tokens = min(remaining, budget)
            if seq.prefilled == 0:
                tokens = max(tokens, seq.virtual_tokens + 1)  # the virtual tokens go in with the first chunk
            plan.append((seq, tokens))
            budget -= tokens
        return plan

    def _forward(self, decoding: list[Sequence], plan: list[tuple[Sequence, int]]) -> None:
        """One packed forward: a decode token for every running sequence and this step's prompt chunks.
        Sequences whose prompt it completes get their first token and join the decoding rows."""
        started = time.perf_counter()
        decode_work = [Work(seq.slot, seq.position, [seq.output_ids[-1]]) for seq in decoding]
        prefill_work, completing = [], []
        row_keys = [seq.adapter_key for seq in decoding]
        for seq, tokens in plan:
            work = self._chunk(seq, tokens)
            prefill_work.append(work)
            row_keys.extend([seq.adapter_key] * tokens)
            if work.logits:
                completing.append(seq)
        if self.adapters is not None:
            self.adapters.set_rows(row_keys, packed=True)
        classes = {seq.slot.capacity for seq in decoding}
        if self._graphs is not None and not plan and not any(row_keys) and self._graphs.applies(classes, len(decoding)):
            logits = self._graphs.step(
                classes.pop(),
                [w.slot.row for w in decode_work],
                [w.start for w in decode_work],
                [w.tokens[0] for w in decode_work],
            )
        else:
            logits = forward(self._model, self.kv, decode_work, prefill_work)
        for seq in completing:
            seq.sampler = self._sampler(seq, logits.shape[-1])
            seq.detokenizer = IncrementalDetokenizer(self._tokenizer, seq.prompt_ids)
        seqs = [*decoding, *completing]
        picks = sample(logits, [seq.sampler for seq in seqs])
        self.prefill_budget.observe_step(len(decoding), sum(t for _, t in plan), time.perf_counter() - started)
        for seq, count in plan:
            seq.prefilled += count
            self._cache_prefix(seq)  # block by block as chunks complete, so no step copies a whole prompt
        if decoding:
            self._metrics.batch_size.observe(len(decoding))
        if completing:
            self._join(completing)
        self._accept(seqs, picks)

    def _sampler(self, seq: Sequence, vocab_size: int) -> RowSampler:
        constraint = Constraint(seq.grammar, self._eos) if seq.grammar is not None else None
        return RowSampler.create(
            seq.config,
            seq.prompt_ids,
            self._model.device,
            vocab_size=vocab_size,
            end_ids=self._eos,
            constraint=constraint,
        )

    def _chunk(self, seq: Sequence, tokens: int) -> Work:
        """The work of prefilling `seq`'s next `tokens` positions: its virtual tokens first, then the prompt."""
        start = seq.prefilled
        done = start + tokens == seq.prompt_cost
        if start == 0 and seq.virtual_tokens:
            prefix = self.adapters.prefix(seq.adapter_key)
            ids = [self._pad_id] * seq.virtual_tokens + seq.prompt_ids[: tokens - seq.virtual_tokens]
            return Work(seq.slot, 0, ids, logits=done, prefix=prefix)
        offset = start - seq.virtual_tokens
        return Work(seq.slot, start, seq.prompt_ids[offset : offset + tokens], logits=done)

    def _join(self, seqs: list[Sequence]) -> None:
        """Sequences whose prompt KV is now complete join the decoding rows."""
        for seq in seqs:
            self._metrics.prompt_tokens.inc(len(seq.prompt_ids))
        joined = {id(seq) for seq in seqs}
        self._prefilling = [s for s in self._prefilling if id(s) not in joined]
        self._running = sorted([*self._running, *seqs], key=lambda s: s.slot)

    def _cache_prefix(self, seq: Sequence) -> None:
        """Put the full blocks of the prompt prefilled so far into the prefix cache (blocks already there
        are only touched)."""
        if self.prefix_cache is None or not self.prefix_cache.enabled or seq.virtual_tokens:
            return
        done = seq.prefilled // self.prefix_cache.block_tokens * self.prefix_cache.block_tokens
        if done > seq.in_prefix_cache:
            self.prefix_cache.insert(seq.adapter_key, seq.prompt_ids[:done], self.kv.row_layers(seq.slot, done))
            seq.in_prefix_cache = done
            self._metrics.prefix_cache_bytes.set(self.prefix_cache.nbytes)

    def _accept(self, seqs: list[Sequence], picks: Picks) -> None:
        """Hand each sequence its new token, then drop the finished from the running batch."""
        now = time.perf_counter()
        self._metrics.generation_tokens.inc(len(picks.tokens))
        for seq, token, logprobs in zip(seqs, picks.tokens, picks.logprobs, strict=True):
            if seq.last_token_at is None:
                self._metrics.time_to_first_token.observe(now - seq.arrival)
            else:
                self._metrics.inter_token_latency.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._advance(seq, token, logprobs)
        self._remove_finished()

    def _advance(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        seq.output_ids.append(token)
        if not seq.sampler.observe(token):
            log.error("a constrained row took a token its grammar refused", extra={"model": self.model_name})
            self._finish(seq, error=ServiceError("constrained decoding failed; the server logged it"))
            return
        # a grammar ends only on an end token (its stop tokens are the model's): then the row ends, ignore_eos or not
        grammar_done = seq.sampler.constraint is not None and seq.sampler.constraint.terminated
        if token in self._eos and (grammar_done or not seq.config.ignore_eos):
            self._finish(seq, FinishReason.EOS)  # the end token itself is neither text nor a logprob
            return
        if logprobs is not None:
            seq.pending_logprobs.append(GeneratedLogprob.of(token, logprobs))
        text = seq.stop_matcher.feed(seq.detokenizer.push(token))
        if seq.stop_matcher.stopped or token in seq.config.stop_token_ids:
            self._finish(seq, FinishReason.STOP, text)
        elif len(seq.output_ids) >= seq.config.max_new_tokens:
            self._finish(seq, FinishReason.LENGTH, text)
        elif text or seq.pending_logprobs:
            seq.on_event(GenerationEvent(text, logprobs=self._take_logprobs(seq)))

    @staticmethod
    def _take_logprobs(seq: Sequence) -> tuple[GeneratedLogprob, ...]:
        taken = tuple(seq.pending_logprobs)
        seq.pending_logprobs.clear()
        return taken

    def _finish(
        self, seq: Sequence, reason: FinishReason | None = None, text: str = "", error: ServiceError | None = None
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if reason is not None and not seq.stop_matcher.stopped and seq.detokenizer is not None:
            # release what the detokenizer and the stop matcher held back (EOS itself decodes to nothing)
            text += seq.stop_matcher.feed(seq.detokenizer.flush())
            if seq.stop_matcher.stopped:
                reason = FinishReason.STOP
            else:
                text += seq.stop_matcher.flush()
        if reason is not None:
            self._metrics.e2e_latency.observe(time.perf_counter() - seq.arrival)
            metrics.REQUESTS_FINISHED.labels(self.model_name, reason.value).inc()
        if seq.adapter_key is not None:
            self.adapters.release(seq.adapter_key)
            seq.adapter_key = None
        seq.on_event(
            GenerationEvent(
                text,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                seed=seq.config.seed,
                logprobs=self._take_logprobs(seq),
            )
        )

    def _drop_abandoned(self) -> None:
        """Cancelled clients and passed deadlines free their batch slot before the next step."""
        now = time.monotonic()
        for seq in [*self._running, *self._prefilling]:
            if seq.cancelled:
                self._finish(seq, error=Cancelled("the client cancelled the request"))
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, error=DeadlineExceeded("the request's deadline passed during generation"))
        self._remove_finished()

    def _remove_finished(self) -> None:
        done = [seq for seq in [*self._running, *self._prefilling] if seq.finished]
        if not done:
            return
        self._running = [seq for seq in self._running if not seq.finished]
        self._prefilling = [seq for seq in self._prefilling if not seq.finished]
        for seq in done:
            self._release_slot(seq)
        self._metrics.requests_running.set(self.num_running)
        self._metrics.kv_cache_bytes.set(self.kv.nbytes)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None

    def _fail_all(self, error: ServiceError) -> None:
        for seq in [*self._running, *self._prefilling, *self._waiting.drain()]:
            self._finish(seq, error=error)
            seq.slot = None
        self._running, self._prefilling = [], []
        self.kv.clear()
        self._metrics.requests_running.set(0)
        self._metrics.kv_cache_bytes.set(0)


def prompt_too_long(prompt_tokens: int, max_prompt_tokens: int) -> InvalidArgument:
    return InvalidArgument(
        f"the prompt is {prompt_tokens} tokens; this server accepts prompts of at most {max_prompt_tokens} tokens "
        "(llm.max_prompt_tokens); shorten the prompt"
    )


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends generation: the generation config's (often a list) and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple | torch.Tensor):
            ids.update(int(v) for v in value)
    return ids
