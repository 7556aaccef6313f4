"""A served LLM: its tokenizer, prompt building, request validation and engine, behind one name."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from jinja2 import TemplateError

from services.llm.adapters import LoraAdapterCache
from services.llm.batch import check_cache_support
from services.llm.engine import LLMEngine, Sequence, eos_token_ids
from services.llm.lora import LoraLimits
from services.llm.params import Limits, SamplingRequest, resolve_sampling
from services.llm.prefix_cache import PrefixCache
from shared.adapters import AdapterStore, validate_adapter_name
from shared.devices import dtype_name
from shared.errors import InvalidArgument
from shared.loaders import LoadedCausalLM
from shared.settings import LLMSettings

_FALLBACK_CONTEXT = 2048


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no reason given"


def context_length(model, tokenizer) -> int:
    length = getattr(model.config, "max_position_embeddings", None)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and tokenizer_max < 1_000_000:
        length = min(length, tokenizer_max) if length else tokenizer_max
    return length or _FALLBACK_CONTEXT


class ServedLLM:
    def __init__(self, loaded: LoadedCausalLM, settings: LLMSettings, store: AdapterStore):
        self.entry = loaded.entry
        check_cache_support(loaded.model)
        self.device = loaded.device
        self.dtype = dtype_name(loaded.dtype)
        self.tokenizer = loaded.tokenizer
        self.context_length = context_length(loaded.model, loaded.tokenizer)
        self.limits = Limits(settings.default_max_new_tokens, settings.max_new_tokens_limit, self.context_length)
        self.adapters = LoraAdapterCache(
            loaded.model,
            store,
            settings.adapter_cache_size,
            self.entry.name,
            self.entry.source,
            limits=LoraLimits.from_settings(settings),
        )
        self.max_prompt_chars = settings.max_prompt_chars
        self.engine = LLMEngine(
            loaded.model,
            loaded.tokenizer,
            model_name=self.entry.name,
            eos_token_ids=eos_token_ids(loaded.model, loaded.tokenizer),
            max_batch_size=settings.max_batch_size,
            max_waiting=settings.max_waiting_requests,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_prefill_tokens=settings.max_prefill_tokens,
            adapters=self.adapters,
            prefix_cache=PrefixCache(settings.prefix_cache_block_tokens, settings.prefix_cache_bytes),
            kv_cache_bytes=settings.kv_cache_bytes,
            cuda_graphs=settings.cuda_graphs and loaded.device.type == "cuda",
        )
        self._encode_lock = threading.Lock()  # fast tokenizers are not safe to encode from two threads

    def _check_size(self, chars: int, what: str) -> None:
        """A cheap bound before tokenizing: a huge text must not hold the tokenizer lock for long."""
        if chars > self.max_prompt_chars:
            raise InvalidArgument(
                f"the {what} is {chars} characters; the limit is {self.max_prompt_chars} (llm.max_prompt_chars)"
            )

    def encode_prompt(self, text: str) -> list[int]:
        self._check_size(len(text), "text")
        with self._encode_lock:
            return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[ChatTurn]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {self.entry.name!r} has no chat template; send a prompt instead of messages")
        for i, turn in enumerate(messages):
            if not turn.role:
                raise InvalidArgument(f"messages[{i}].role is empty; use system, user or assistant")
        self._check_size(sum(len(t.role) + len(t.content) for t in messages), "conversation")
        conversation = [{"role": t.role, "content": t.content} for t in messages]
        try:
            with self._encode_lock:
                encoded = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:  # the template's own checks, e.g. "roles must alternate"
            raise InvalidArgument(f"the model's chat template rejected the messages: {_first_line(exc)}") from exc
        except Exception as exc:
            raise InvalidArgument("the model's chat template could not render these messages") from exc
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def new_sequence(
        self,
        *,
        prompt: str,
        messages: list[ChatTurn],
        adapter: str,
        sampling: SamplingRequest,
        on_event,
        deadline: float | None,
    ) -> Sequence:
        """Validate a request's form and sampling, and turn it into an engine sequence; `engine.submit` checks
        it against the engine's limits."""
        if bool(prompt) == bool(messages):
            raise InvalidArgument("set exactly one of prompt or messages")
        virtual_tokens, version = 0, None
        if adapter:
            validate_adapter_name(adapter)
            version = self.adapters.resolve(adapter).version  # the one read of its metadata for this request
            virtual_tokens = self.adapters.virtual_tokens(adapter)  # p-tuning: they take context too
        prompt_ids = self.encode_prompt(prompt) if prompt else self.encode_chat(messages)
        if not prompt_ids:
            raise InvalidArgument("the prompt encodes to no tokens")
        config = resolve_sampling(sampling, len(prompt_ids) + virtual_tokens, self.limits)
        seq = Sequence(
            prompt_ids, config, on_event, adapter=adapter or None, deadline=deadline, adapter_version=version
        )
        seq.virtual_tokens = virtual_tokens  # prefill sets it from the adapter it loads
        return seq

    def start(self, on_death=None) -> None:
        self.engine.start(on_death)

    def shutdown(self) -> None:
        self.engine.shutdown()
