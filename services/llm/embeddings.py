"""Text embeddings: the inputs of many calls in one forward, each pooled into one vector, on their own thread.

The engine thread takes every waiting call whose inputs fit the batch-token budget, sorts all their inputs by
length (so little is padded), runs them through the model in as few padded forwards as the budget allows,
pools each row's hidden states as its call asked (mean over its tokens, its last token, or its first), then
truncates (Matryoshka models) and normalizes per call. Padding is masked out of attention and of the
pooling, so an input's vector does not depend on what it was batched with.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import torch

from services.llm import metrics
from shared.devices import is_fatal_device_error
from shared.engine_thread import EngineThread
from shared.errors import ServiceError
from shared.waiting import WaitingQueue

log = logging.getLogger(__name__)

POOLINGS = ("mean", "last", "cls")


@dataclass
class EmbedJob:
    """One Embed call: token ids per input, and how to pool them; `done` gets the vectors (or the error)."""

    inputs: list[list[int]]
    pooling: str
    normalize: bool
    dimensions: int = 0  # 0: the model's full width
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


class EmbeddingEngine:
    def __init__(self, model, *, model_name: str, pad_id: int, max_batch_tokens: int, max_waiting: int):
        self._model = model
        self.model_name = model_name
        self._pad_id = pad_id
        self._max_batch_tokens = max_batch_tokens
        self._waiting: WaitingQueue[EmbedJob] = WaitingQueue(
            model_name, max_waiting, metrics.EMBED_WAITING.labels(model_name).set
        )
        self._thread = EngineThread(f"embed-{model_name}", self._waiting, self._loop, self._fail_all)
        self._inputs = metrics.EMBED_INPUTS.labels(model_name)
        self._tokens = metrics.EMBED_TOKENS.labels(model_name)
        self._latency = metrics.EMBED_LATENCY.labels(model_name)

    def start(self, on_death=None) -> None:
        self._thread.start(on_death)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._thread.stop(timeout)

    def submit(self, job: EmbedJob) -> None:
        self._waiting.put(job)

    def _loop(self) -> None:
        waiting = self._waiting
        while True:
            with waiting.cond:
                while not waiting.closed and not waiting.items:
                    waiting.cond.wait()
                if waiting.closed:
                    return
                jobs, tokens = [], 0
                while waiting.items and (not jobs or tokens + waiting.items[0].tokens <= self._max_batch_tokens):
                    job = waiting.items.popleft()
                    if not job.cancelled:
                        jobs.append(job)
                        tokens += job.tokens
                waiting.publish()
            self._run(jobs)

    def _run(self, jobs: list[EmbedJob]) -> None:
        try:
            vectors = self._embed_all(jobs)
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise
            log.error("embedding step failed", exc_info=exc, extra={"model": self.model_name, "calls": len(jobs)})
            for job in jobs:
                job.done.set_exception(ServiceError("the embedding engine hit an internal error; the server logged it"))
            return
        now = time.perf_counter()
        for job, result in zip(jobs, vectors, strict=True):
            self._inputs.inc(len(job.inputs))
            self._tokens.inc(job.tokens)
            self._latency.observe(now - job.arrival)
            job.done.set_result(result)

    def _embed_all(self, jobs: list[EmbedJob]) -> list[torch.Tensor]:
        """Each job's vectors (N, D), running all their inputs in padded batches under the token budget."""
        rows = [(j, i) for j, job in enumerate(jobs) for i in range(len(job.inputs))]
        rows.sort(key=lambda r: len(jobs[r[0]].inputs[r[1]]))
        pooled: dict[tuple[int, int], torch.Tensor] = {}
        for batch in _batches(rows, lambda r: len(jobs[r[0]].inputs[r[1]]), self._max_batch_tokens):
            ids = [jobs[j].inputs[i] for j, i in batch]
            vectors = embed_batch(self._model, ids, [jobs[j].pooling for j, _ in batch], self._pad_id)
            pooled.update(zip(batch, vectors, strict=True))
        out = []
        for j, job in enumerate(jobs):
            stacked = torch.stack([pooled[(j, i)] for i in range(len(job.inputs))])
            if job.dimensions:
                stacked = stacked[:, : job.dimensions]
            if job.normalize:
                stacked = torch.nn.functional.normalize(stacked, dim=-1)
            out.append(stacked.cpu())
        return out

    def _fail_all(self, error: ServiceError) -> None:
        for job in self._waiting.drain():
            if not job.done.done():
                job.done.set_exception(error)


def _batches(rows: list, length, max_tokens: int):
    """Consecutive groups of `rows` (sorted by length) whose padded size (count x longest) fits `max_tokens`;
    a row longer than the budget goes alone."""
    batch: list = []
    for row in rows:
        if batch and (len(batch) + 1) * length(row) > max_tokens:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def embed_batch(model, ids: list[list[int]], poolings: list[str], pad_id: int) -> torch.Tensor:
    """One padded forward of `ids`; each row pooled as its `poolings` entry says (B, hidden), float32."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(x) for x in ids], device=device)
    width = int(lengths.max())
    padded = [x + [pad_id] * (width - len(x)) for x in ids]
    input_ids = torch.tensor(padded, dtype=torch.long, device=device)
    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    with torch.inference_mode():
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
    mean = (hidden * mask[..., None]).sum(1) / lengths[:, None]
    last = hidden[torch.arange(len(ids), device=device), lengths - 1]
    first = hidden[:, 0]
    by_kind = {"mean": mean, "last": last, "cls": first}
    return torch.stack([by_kind[p][row] for row, p in enumerate(poolings)])
