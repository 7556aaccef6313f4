"""A served LLM: its tokenizer, prompt building, request validation and engine, behind one name."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from jinja2 import TemplateError

from services.llm.adapters import LoraAdapterCache
from services.llm.batch import check_cache_support
from services.llm.engine import LLMEngine, Sequence, eos_token_ids
from services.llm.grammar import FormatSpec, GrammarCompiler
from services.llm.lora import LoraLimits
from services.llm.onednn_linear import use_onednn_linears
from services.llm.params import Limits, SamplingRequest, resolve_sampling
from services.llm.prefix_cache import PrefixCache
from services.llm.tool_formats import FORMATS, Call, detect
from services.llm.tools import AUTO, ToolChoice, ToolSpec, offered_tools, tool_grammar
from shared.adapters import AdapterInfo, AdapterStore, validate_adapter_name
from shared.devices import dtype_name
from shared.errors import InvalidArgument
from shared.loaders import LoadedCausalLM
from shared.settings import LLMSettings

_FALLBACK_CONTEXT = 2048


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    tool_calls: tuple[tuple[str, str, str], ...] = ()  # an assistant turn's calls: (id, name, arguments JSON)
    tool_call_id: str = ""  # a tool turn: the call it answers


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no reason given"


def _with_system_text(conversation: list[dict], text: str) -> list[dict]:
    """The conversation with `text` at the start of its system message (one is added if it has none)."""
    if conversation and conversation[0]["role"] == "system":
        first = dict(conversation[0], content=text + "\n\n" + conversation[0]["content"])
        return [first, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


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
        self.dtype_reason = loaded.dtype_reason
        self.weight_bytes = loaded.weight_bytes
        self.tokenizer = loaded.tokenizer
        self.context_length = context_length(loaded.model, loaded.tokenizer)
        vocab_size = loaded.model.get_output_embeddings().weight.shape[0]  # the logits' width
        self.limits = Limits(
            settings.default_max_new_tokens, settings.max_new_tokens_limit, self.context_length, vocab_size
        )
        self.grammars = GrammarCompiler(
            loaded.tokenizer,
            vocab_size,
            cache_size=settings.grammar_cache_size,
            max_compile_s=settings.max_grammar_compile_s,
            max_chars=settings.max_grammar_chars,
        )
        self._vocab: tuple[list[bytes], list[str]] | None = None
        template = getattr(loaded.tokenizer, "chat_template", None) or ""
        self.tool_format = FORMATS.get(self.entry.tool_parser) or detect(template)
        self._template_renders_tools = "tools" in template
        self._template_renders_calls = "tool_calls" in template
        if settings.onednn_linears:
            use_onednn_linears(loaded.model)
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

    def encode_chat(self, messages: list[ChatTurn], tools: list[ToolSpec] = ()) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {self.entry.name!r} has no chat template; send a prompt instead of messages")
        for i, turn in enumerate(messages):
            if not turn.role:
                raise InvalidArgument(f"messages[{i}].role is empty; use system, user, assistant or tool")
        self._check_size(sum(len(t.role) + len(t.content) for t in messages), "conversation")
        conversation = [self._turn(i, t) for i, t in enumerate(messages)]
        schemas = [t.as_openai() for t in tools] or None
        if schemas and not self._template_renders_tools:  # the template knows no tools: we describe them
            conversation = _with_system_text(conversation, self.tool_format.instructions(schemas))
        try:
            with self._encode_lock:
                encoded = self.tokenizer.apply_chat_template(
                    conversation,
                    tools=schemas if self._template_renders_tools else None,
                    add_generation_prompt=True,
                    tokenize=True,
                )
        except TemplateError as exc:  # the template's own checks, e.g. "roles must alternate"
            raise InvalidArgument(f"the model's chat template rejected the messages: {_first_line(exc)}") from exc
        except Exception as exc:
            raise InvalidArgument("the model's chat template could not render these messages") from exc
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _turn(self, index: int, turn: ChatTurn) -> dict:
        """A message as chat templates take it; calls the template cannot render go into the content."""
        message = {"role": turn.role, "content": turn.content}
        if turn.tool_call_id:
            message["tool_call_id"] = turn.tool_call_id
        if not turn.tool_calls:
            return message
        calls = []
        for call_id, name, arguments in turn.tool_calls:
            try:
                parsed = json.loads(arguments or "{}")
            except ValueError:
                raise InvalidArgument(
                    f"messages[{index}] has a tool call to {name!r} whose arguments are not JSON"
                ) from None
            calls.append((call_id, Call(name, parsed)))
        if self._template_renders_calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for i, c in calls
            ]
        else:
            message["content"] = (turn.content + "\n" if turn.content else "") + self.tool_format.render_calls(
                [c for _, c in calls]
            )
        return message

    def new_sequence(
        self,
        *,
        prompt: str,
        messages: list[ChatTurn],
        adapter: str,
        sampling: SamplingRequest,
        on_event,
        deadline: float | None,
        response_format: FormatSpec | None = None,
        tools: list[ToolSpec] = (),
        tool_choice: ToolChoice = AUTO,
        adapter_info: AdapterInfo | None = None,  # the adapter's metadata, when the caller read it already
    ) -> Sequence:
        """Validate a request's form and sampling, and turn it into an engine sequence; `engine.submit` checks
        it against the engine's limits."""
        if bool(prompt) == bool(messages):
            raise InvalidArgument("set exactly one of prompt or messages")
        virtual_tokens, version = 0, None
        if adapter:
            validate_adapter_name(adapter)
            version = self.adapters.resolve(adapter, adapter_info).version  # its metadata, read once per request
            virtual_tokens = self.adapters.virtual_tokens(adapter)  # p-tuning: they take context too
        response_format, offered = self._output_format(bool(prompt), response_format, list(tools), tool_choice)
        prompt_ids = self.encode_prompt(prompt) if prompt else self.encode_chat(messages, offered)
        if not prompt_ids:
            raise InvalidArgument("the prompt encodes to no tokens")
        config = resolve_sampling(sampling, len(prompt_ids) + virtual_tokens, self.limits)
        grammar = None
        if response_format is not None:
            if config.min_new_tokens:
                raise InvalidArgument("min_new_tokens cannot be combined with a response_format or tools")
            grammar = self.grammars.compile(response_format)  # on the request's thread, never the engine's
        seq = Sequence(
            prompt_ids,
            config,
            on_event,
            adapter=adapter or None,
            deadline=deadline,
            adapter_version=version,
            grammar=grammar,
        )
        seq.virtual_tokens = virtual_tokens  # prefill sets it from the adapter it loads
        return seq

    def _output_format(
        self, is_prompt: bool, response_format: FormatSpec | None, tools: list[ToolSpec], tool_choice: ToolChoice
    ) -> tuple[FormatSpec | None, list[ToolSpec]]:
        """The format the output must follow (the response_format, or the tools' calls), and the tools shown."""
        offered = offered_tools(tools, tool_choice)
        if tools and is_prompt:
            raise InvalidArgument("tools need messages (a conversation), not a prompt")
        if offered and response_format is not None:
            raise InvalidArgument("set either tools or a response_format, not both")
        if offered:
            return tool_grammar(self.tool_format, offered, tool_choice), offered
        return response_format, offered

    def token_bytes(self, token_id: int) -> bytes:
        """A token's bytes as the vocabulary holds them (part of a UTF-8 character, for some tokens)."""
        return self._vocabulary()[0][token_id]

    def token_text(self, token_id: int) -> str:
        """A token's text for log-probabilities: its bytes, with an incomplete character shown as U+FFFD."""
        return self._vocabulary()[1][token_id]

    def _vocabulary(self) -> tuple[list[bytes], list[str]]:
        """Every token's bytes and text, read once, on the first request that asks for logprobs (xgrammar
        builds its `decoded_vocab` list anew on each access)."""
        if self._vocab is None:
            vocab = self.grammars.info.decoded_vocab
            self._vocab = (vocab, [b.decode("utf-8", errors="replace") for b in vocab])
        return self._vocab

    def start(self, on_death=None) -> None:
        self.engine.start(on_death)

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.grammars.shutdown()
