"""Driving the LLM engine directly: an engine on the tiny model, and a collector of a sequence's events."""

from __future__ import annotations

import threading

import torch

from services.llm.adapters import LoraAdapterCache
from services.llm.engine import LLMEngine, Sequence, eos_token_ids
from services.llm.params import SamplingConfig
from shared.adapters import AdapterStore

PROMPTS = ["def parse(text):", "import os\nimport sys\n\nclass Loader:", "x = [", "# Copyright"]
HELD = 100_000  # new tokens no test waits for: such a sequence runs until the test ends it


class Collector:
    """Gathers a sequence's events; `wait()` returns (text, final event)."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.final:
            self.done.set()

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "sequence did not finish"
        return "".join(e.text for e in self.events), self.events[-1]


class GatedCollector(Collector):
    """A collector that holds the engine thread at this sequence's first event until `release()`.

    While it holds, the engine can take no step, so whatever a test submits meanwhile is admitted together
    at the next step, next to this still-running sequence: ordering by construction, not by timing.
    """

    def __init__(self):
        super().__init__()
        self.holding = threading.Event()
        self._gate = threading.Event()

    def __call__(self, event):
        super().__call__(event)
        if len(self.events) == 1 and not event.final:
            self.holding.set()
            assert self._gate.wait(120), "the test never released the engine"

    def release(self):
        self._gate.set()


def make_engine(loaded, settings, **overrides):
    cache = LoraAdapterCache(
        loaded.model, AdapterStore(settings.adapters_dir), overrides.pop("capacity", 8), "tiny-llm", "builtin:tiny-llm"
    )
    options = dict(max_batch_size=16, max_waiting=64, max_prompt_tokens=4096) | overrides
    return LLMEngine(
        loaded.model,
        loaded.tokenizer,
        model_name="tiny-llm",
        eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
        adapters=cache,
        **options,
    )


def encode(loaded, text):
    return loaded.tokenizer(text)["input_ids"]


def run(engine, loaded, prompt, adapter=None, **config):
    config = SamplingConfig(**({"max_new_tokens": 16, "ignore_eos": True} | config))
    collector = Collector()
    engine.submit(Sequence(encode(loaded, prompt), config, collector, adapter=adapter))
    return collector.wait()


def hf_greedy(loaded, prompt, n):
    ids = torch.tensor([encode(loaded, prompt)])
    out = loaded.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
