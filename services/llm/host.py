"""The models one LLM server hosts: generative LLMs (each a `ServedLLM`) and embedding models."""

from __future__ import annotations

from services.llm.served import ServedLLM
from services.llm.served_embedder import ServedEmbedder
from shared.adapters import AdapterStore
from shared.hosting import ModelHost
from shared.loaders import load_causal_lm, load_encoder
from shared.settings import ModelEntry, Settings


def llm_host(settings: Settings) -> ModelHost[ServedLLM]:
    store = AdapterStore(settings.adapters_dir)

    def load(entry: ModelEntry) -> ServedLLM:
        return ServedLLM(load_causal_lm(entry, settings), settings.llm, store)

    return ModelHost(settings, "llm", load)


def embedding_host(settings: Settings) -> ModelHost[ServedEmbedder]:
    def load(entry: ModelEntry) -> ServedEmbedder:
        return ServedEmbedder(load_encoder(entry, settings), settings.llm)

    return ModelHost(settings, "embedding", load)
