"""The LLMs one server hosts, each a started `ServedLLM`."""

from __future__ import annotations

from services.llm.served import ServedLLM
from shared.adapters import AdapterStore
from shared.hosting import ModelHost
from shared.loaders import load_causal_lm
from shared.settings import ModelEntry, Settings


def llm_host(settings: Settings) -> ModelHost[ServedLLM]:
    store = AdapterStore(settings.adapters_dir)

    def load(entry: ModelEntry) -> ServedLLM:
        return ServedLLM(load_causal_lm(entry, settings), settings.llm, store)

    return ModelHost(settings, "llm", load)
