"""A served embedding model: its tokenizer, request validation and engine, behind one name."""

from __future__ import annotations

import threading

from services.llm.embeddings import POOLINGS, EmbeddingEngine, EmbedJob
from services.llm.served import context_length
from shared.devices import dtype_name
from shared.errors import InvalidArgument
from shared.loaders import LoadedCausalLM
from shared.settings import LLMSettings


class ServedEmbedder:
    def __init__(self, loaded: LoadedCausalLM, settings: LLMSettings):
        self.entry = loaded.entry
        self.device = loaded.device
        self.dtype = dtype_name(loaded.dtype)
        self.dtype_reason = loaded.dtype_reason
        self.weight_bytes = loaded.weight_bytes
        self.tokenizer = loaded.tokenizer
        self.dimensions = loaded.model.config.hidden_size
        self.context_length = context_length(loaded.model, loaded.tokenizer)
        self.max_input_tokens = min(settings.max_embed_input_tokens, self.context_length)
        self.max_inputs = settings.max_embed_inputs
        self.max_chars = settings.max_prompt_chars
        pad_id = loaded.tokenizer.pad_token_id
        self.engine = EmbeddingEngine(
            loaded.model,
            model_name=self.entry.name,
            pad_id=pad_id if pad_id is not None else 0,
            max_batch_tokens=max(settings.max_embed_batch_tokens, self.max_input_tokens),
            max_waiting=settings.max_waiting_requests,
        )
        self._encode_lock = threading.Lock()  # fast tokenizers are not safe to encode from two threads

    def new_job(self, inputs: list[str], pooling: str, normalize: bool | None, dimensions: int) -> EmbedJob:
        """Check a call against this model's limits and tokenize it; every error names the limit."""
        defaults = self.entry.embedding
        if not inputs:
            raise InvalidArgument("inputs is empty; send at least one text")
        if len(inputs) > self.max_inputs:
            raise InvalidArgument(f"{len(inputs)} inputs; the limit is {self.max_inputs} (llm.max_embed_inputs)")
        if pooling and pooling not in POOLINGS:
            raise InvalidArgument(f"pooling must be one of {', '.join(POOLINGS)}")
        self._check_dimensions(dimensions)
        total = sum(len(text) for text in inputs)
        if total > self.max_chars:
            raise InvalidArgument(
                f"the inputs are {total} characters; the limit is {self.max_chars} (llm.max_prompt_chars)"
            )
        with self._encode_lock:
            ids = [list(x) for x in self.tokenizer(inputs)["input_ids"]]
        for i, (text, tokens) in enumerate(zip(inputs, ids, strict=True)):
            if not text:
                raise InvalidArgument(f"inputs[{i}] is empty")
            if len(tokens) > self.max_input_tokens:
                raise InvalidArgument(
                    f"inputs[{i}] is {len(tokens)} tokens; this model embeds at most {self.max_input_tokens} "
                    "(llm.max_embed_input_tokens and the model's context)"
                )
        return EmbedJob(
            ids,
            pooling or defaults.pooling,
            defaults.normalize if normalize is None else normalize,
            dimensions,
        )

    def _check_dimensions(self, dimensions: int) -> None:
        if not dimensions or dimensions == self.dimensions:
            return
        if not self.entry.embedding.matryoshka:
            raise InvalidArgument(
                f"model {self.entry.name!r} gives {self.dimensions}-dimensional vectors and was not trained to be "
                "truncated (embedding.matryoshka); leave dimensions unset"
            )
        if dimensions > self.dimensions:
            raise InvalidArgument(f"dimensions must be at most {self.dimensions} for model {self.entry.name!r}")

    def start(self, on_death=None) -> None:
        self.engine.start(on_death)

    def shutdown(self) -> None:
        self.engine.shutdown()
