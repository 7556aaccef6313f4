"""The continuous-batching engine: one thread that owns the model and decodes all sequences together.

Each loop iteration: drop cancelled and expired sequences, admit waiting ones, prefill what this step's
budget allows, run one decode step for every running sequence, hand each sequence its new text, and
remove the finished. Sequences join and leave at every step, each with its own sampling parameters, seed
and LoRA adapter. No gRPC here: callers get events through a callback.

Prefill: admitted prompts wait in `_prefilling` until their KV is complete. A prompt whose leading blocks
are in the prefix cache starts from that KV. Prompts that fit the step's budget whole and have nothing
cached are prefilled together in one forward; the others go a chunk per step (`PrefillBudget`), so a long
prompt never stalls the running streams for more than about one chunk. A prompt joins the running batch
with its first token once its prefill is complete, and its full blocks go into the prefix cache.
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
from services.llm.batch import KVBatch, decode, prefill, prefill_more
from services.llm.detokenizer import IncrementalDetokenizer
from services.llm.params import SamplingConfig
from services.llm.prefill_budget import BURST_TOKENS, SHORT_PROMPT_TOKENS, PrefillBudget
from services.llm.prefix_cache import PrefixCache
from services.llm.sampling import RowSampler, next_tokens
from services.llm.stop import StopStringMatcher
from shared.devices import is_fatal_device_error
from shared.engine_thread import EngineThread
from shared.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError
from shared.waiting import WaitingQueue

log = logging.getLogger(__name__)


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

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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
    ):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.config = config
        self.adapter = adapter
        self.deadline = deadline
        self.on_event = on_event
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
        self.kv: KVBatch | None = None  # its own KV while its prompt is prefilled over several steps
        self.prefilled = 0  # virtual and prompt tokens whose KV exists
        self.cached = 0  # of which came from the prefix cache

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_cost(self) -> int:
        """Positions the prefill fills: the virtual tokens, then the prompt."""
        return self.virtual_tokens + len(self.prompt_ids)

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
    ):
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
        self._running: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # taken from the queue, prompt KV not complete yet
        self._batch: KVBatch | None = None
        self._thread = EngineThread(f"engine-{model_name}", self._waiting, self._loop, self._fail_all)

    # -- called from other threads ------------------------------------------------------------------

    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        self._thread.start(on_death)

    def submit(self, seq: Sequence) -> None:
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
        """Admit and prefill, then decode. A failure fails only the sequences of the phase that raised it;
        a fatal device error ends the loop (and the process), since every later step would fail too."""
        self._drop_abandoned()
        self._admit()
        plan = self._plan_prefill()
        if plan:
            self._guarded(lambda _: self._prefill(plan), [seq for seq, _ in plan])
        if self._running:
            self._guarded(self._decode, self._running)

    def _guarded(self, phase: Callable[[list[Sequence]], None], seqs: list[Sequence]) -> None:
        seqs = list(seqs)
        try:
            phase(seqs)
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise
            if isinstance(exc, torch.OutOfMemoryError):
                log.warning("out of device memory", extra={"model": self.model_name, "sequences": len(seqs)})
                _release_cached_memory(self._model.device)
                error: ServiceError = ResourceExhausted(
                    "the server ran out of accelerator memory for this request; retry with a shorter prompt "
                    "or fewer new tokens"
                )
            else:
                log.exception("engine step failed", extra={"model": self.model_name, "sequences": len(seqs)})
                error = ServiceError("the engine hit an internal error; the server logged it")
            for seq in seqs:
                self._finish(seq, error=error)
            self._remove_finished()

    def _admit(self) -> None:
        """Take waiting sequences while the batch has room; each starts its prefill (from the prefix cache
        where its prompt's first blocks are there)."""
        taken: list[Sequence] = []
        unfit: list[Sequence] = []
        waiting = self._waiting
        with waiting.cond:
            while waiting.items and self.num_running + len(taken) < self._max_batch:
                seq = waiting.items.popleft()
                if seq.cancelled or seq.prompt_cost > self._max_prompt_tokens:
                    unfit.append(seq)
                else:
                    taken.append(seq)
            waiting.publish()
        for seq in unfit:  # validation refuses such prompts; a caller that skipped it gets told here
            if not seq.cancelled:
                self._finish(seq, error=prompt_too_long(seq.prompt_cost, self._max_prompt_tokens))
        for seq in taken:
            if seq.adapter and self.adapters is not None:
                try:
                    seq.adapter_key = self.adapters.acquire(seq.adapter)
                except Exception as exc:  # this request's adapter, not the batch's problem
                    if is_fatal_device_error(exc):
                        raise
                    if not isinstance(exc, ServiceError):
                        log.exception("adapter load failed", extra={"adapter": seq.adapter})
                        exc = ServiceError(f"adapter {seq.adapter!r} could not be loaded; the server logged why")
                    self._finish(seq, error=exc)
                    continue
            self._start_prefill(seq)
            self._prefilling.append(seq)
        if taken:
            self._metrics.requests_running.set(self.num_running)

    def _start_prefill(self, seq: Sequence) -> None:
        prefix = self.adapters.prefix(seq.adapter_key) if self.adapters is not None else None
        seq.virtual_tokens = 0 if prefix is None else prefix.shape[0]
        if prefix is not None or self.prefix_cache is None or not self.prefix_cache.enabled:
            return  # virtual tokens shift every position: their KV is this request's own
        try:
            cached, layers = self.prefix_cache.lookup(seq.adapter_key, seq.prompt_ids)
            if cached:
                seq.kv, seq.prefilled, seq.cached = KVBatch.of_one_row(self._model, layers), cached, cached
        except Exception as exc:  # the cache only saves work: without it the prompt is prefilled in full
            if is_fatal_device_error(exc):
                raise
            log.warning("prefix cache lookup failed; prefilling in full", exc_info=True)
            seq.kv, seq.prefilled, seq.cached, cached = None, 0, 0, 0
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

    def _select_adapters(self, seqs: list[Sequence]) -> None:
        if self.adapters is not None:
            self.adapters.set_rows([seq.adapter_key for seq in seqs])

    def _prefill(self, plan: list[tuple[Sequence, int]]) -> None:
        """Prefill whole fresh prompts together in one forward, and the rest a chunk each; sequences whose
        prompt is then complete get their first token and join the running batch."""
        started = time.perf_counter()
        whole = [seq for seq, tokens in plan if seq.kv is None and tokens == seq.prompt_cost]
        ready: list[tuple[KVBatch, list[Sequence], torch.Tensor]] = []  # KV, its rows' sequences, logits
        if whole:
            ready.append(self._prefill_whole(whole))
        for seq, tokens in plan:
            if seq not in whole:
                logits = self._prefill_chunk(seq, tokens)
                if seq.prefilled == seq.prompt_cost:
                    ready.append((seq.kv, [seq], logits))
        self.prefill_budget.observe_prefill(sum(tokens for _, tokens in plan), time.perf_counter() - started)
        if ready:
            self._join(ready)

    def _prefill_whole(self, seqs: list[Sequence]) -> tuple[KVBatch, list[Sequence], torch.Tensor]:
        self._select_adapters(seqs)
        prefixes = [self.adapters.prefix(s.adapter_key) for s in seqs] if self.adapters is not None else None
        batch, logits = prefill(self._model, [s.prompt_ids for s in seqs], self._pad_id, prefixes)
        for row, seq in enumerate(seqs):
            seq.prefilled = seq.prompt_cost
            self._cache_prefix(seq, batch, row)
        return batch, seqs, logits

    def _prefill_chunk(self, seq: Sequence, tokens: int) -> torch.Tensor:
        """The next `tokens` positions of one sequence's prompt; returns the logits of the last one (1, V)."""
        self._select_adapters([seq])
        if seq.kv is None:  # the first chunk: the virtual tokens, then the prompt's start
            prefix = self.adapters.prefix(seq.adapter_key) if self.adapters is not None else None
            count = tokens - seq.virtual_tokens
            seq.kv, logits = prefill(self._model, [seq.prompt_ids[:count]], self._pad_id, [prefix])
        else:
            start = seq.prefilled - seq.virtual_tokens
            logits = prefill_more(self._model, seq.kv, seq.prompt_ids[start : start + tokens])
        seq.prefilled += tokens
        if seq.prefilled == seq.prompt_cost:
            self._cache_prefix(seq, seq.kv, 0)
        return logits

    def _cache_prefix(self, seq: Sequence, batch: KVBatch, row: int) -> None:
        if self.prefix_cache is not None and self.prefix_cache.enabled and not seq.virtual_tokens:
            self.prefix_cache.insert(seq.adapter_key, seq.prompt_ids, batch.row_layers(row))
            self._metrics.prefix_cache_bytes.set(self.prefix_cache.nbytes)

    def _join(self, ready: list[tuple[KVBatch, list[Sequence], torch.Tensor]]) -> None:
        """Sequences whose prompt KV is complete: sample their first token and merge their KV into the batch
        (rows in `_running`'s order)."""
        device = self._model.device
        seqs = [seq for _, group, _ in ready for seq in group]
        for seq in seqs:
            seq.sampler = RowSampler.create(seq.config, seq.prompt_ids, device)
            seq.detokenizer = IncrementalDetokenizer(self._tokenizer, seq.prompt_ids)
        tokens = next_tokens(torch.cat([logits for _, _, logits in ready]), [s.sampler for s in seqs])
        for batch, group, _ in ready:  # each merge is all or nothing: the running rows are intact if it raises
            if self._batch is None:
                self._batch = batch
            else:
                self._batch.extend(batch)
            self._running.extend(group)
            for seq in group:
                seq.kv = None
        joined = {id(seq) for seq in seqs}
        self._prefilling = [s for s in self._prefilling if id(s) not in joined]
        self._metrics.requests_running.set(self.num_running)  # before their first token is sent
        for seq in seqs:
            self._metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self._accept(seqs, tokens)

    def _decode(self, seqs: list[Sequence]) -> None:
        assert self._batch is not None and seqs == self._running
        started = time.perf_counter()
        self._metrics.batch_size.observe(len(seqs))
        self._select_adapters(seqs)
        logits = decode(self._model, self._batch, [s.output_ids[-1] for s in seqs], [s.position for s in seqs])
        tokens = next_tokens(logits, [s.sampler for s in seqs])
        self.prefill_budget.observe_decode(time.perf_counter() - started)
        self._accept(seqs, tokens)

    def _accept(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Hand each sequence its new token, then drop the finished from the running batch."""
        now = time.perf_counter()
        self._metrics.generation_tokens.inc(len(tokens))
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.last_token_at is None:
                self._metrics.time_to_first_token.observe(now - seq.arrival)
            else:
                self._metrics.inter_token_latency.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._advance(seq, token)
        self._remove_finished()

    def _advance(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        seq.sampler.observe(token)
        if token in self._eos and not seq.config.ignore_eos:
            self._finish(seq, FinishReason.EOS)
            return
        text = seq.stop_matcher.feed(seq.detokenizer.push(token))
        if seq.stop_matcher.stopped:
            self._finish(seq, FinishReason.STOP, text)
        elif len(seq.output_ids) >= seq.config.max_new_tokens:
            self._finish(seq, FinishReason.LENGTH, text)
        elif text:
            seq.on_event(GenerationEvent(text))

    def _finish(
        self, seq: Sequence, reason: FinishReason | None = None, text: str = "", error: ServiceError | None = None
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if reason in (FinishReason.EOS, FinishReason.LENGTH) and seq.detokenizer is not None:
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
        if any(seq.finished for seq in self._prefilling):
            self._prefilling = [seq for seq in self._prefilling if not seq.finished]
            self._metrics.requests_running.set(self.num_running)
        keep = [i for i, seq in enumerate(self._running) if not seq.finished]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        self._metrics.requests_running.set(self.num_running)
        if keep:
            self._batch.select(keep)
        else:
            self._batch = None

    def _fail_all(self, error: ServiceError) -> None:
        for seq in [*self._running, *self._prefilling, *self._waiting.drain()]:
            self._finish(seq, error=error)
        self._running, self._prefilling, self._batch = [], [], None
        self._metrics.requests_running.set(0)


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
