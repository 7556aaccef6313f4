"""gRPC servicer: translates `modelworks.llm.v1` messages to engine calls and back. No model code here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from services.llm.engine import FinishReason, GeneratedLogprob, GenerationEvent, Sequence
from services.llm.grammar import FormatSpec
from services.llm.params import SamplingRequest
from services.llm.served import ChatTurn, ServedLLM
from services.llm.served_embedder import ServedEmbedder
from services.llm.tools import ToolCall, ToolCallStream, ToolChoice, parse_tools
from shared.adapters import AdapterInfo, AdapterStore
from shared.aiobridge import EventRelay
from shared.errors import FailedPrecondition, NotFound
from shared.hosting import ModelHost

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name

_FINISH_REASONS = {
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: llm_pb2.FINISH_REASON_EOS,
}


def sampling_from_proto(params: llm_pb2.SamplingParams) -> SamplingRequest:
    return SamplingRequest(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p if params.HasField("top_p") else None,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else None,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else None,
        frequency_penalty=params.frequency_penalty if params.HasField("frequency_penalty") else None,
        min_p=params.min_p if params.HasField("min_p") else None,
        logit_bias=dict(params.logit_bias),
        stop_token_ids=tuple(params.stop_token_ids),
        min_new_tokens=params.min_new_tokens,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


def format_from_proto(request: llm_pb2.GenerateRequest) -> FormatSpec | None:
    """The request's response_format, or None when the output is free text."""
    if not request.HasField("response_format"):
        return None
    kind = request.response_format.WhichOneof("format")
    if kind is None or (kind == "json_object" and not request.response_format.json_object):
        return None
    return FormatSpec(kind, "" if kind == "json_object" else getattr(request.response_format, kind))


_POOLINGS = {
    llm_pb2.POOLING_UNSPECIFIED: "",
    llm_pb2.POOLING_MEAN: "mean",
    llm_pb2.POOLING_LAST: "last",
    llm_pb2.POOLING_CLS: "cls",
}

_CHOICE_MODES = {
    llm_pb2.ToolChoice.MODE_UNSPECIFIED: "auto",
    llm_pb2.ToolChoice.AUTO: "auto",
    llm_pb2.ToolChoice.NONE: "none",
    llm_pb2.ToolChoice.REQUIRED: "required",
}


def tool_choice_from_proto(request: llm_pb2.GenerateRequest) -> ToolChoice:
    choice = request.tool_choice
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    if choice.WhichOneof("choice") == "function":
        return ToolChoice("function", choice.function, parallel)
    return ToolChoice(_CHOICE_MODES.get(choice.mode, f"unknown mode {choice.mode}"), parallel=parallel)


def turn_from_proto(message: llm_pb2.ChatMessage) -> ChatTurn:
    calls = tuple((c.id, c.name, c.arguments) for c in message.tool_calls)
    return ChatTurn(message.role, message.content, calls, message.tool_call_id)


def calls_to_proto(calls: list[ToolCall]) -> list[llm_pb2.ToolCall]:
    return [llm_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def logprobs_to_proto(served: ServedLLM, logprobs: tuple[GeneratedLogprob, ...]) -> list[llm_pb2.TokenLogprob]:
    return [
        llm_pb2.TokenLogprob(
            token=served.token_text(lp.token_id),
            id=lp.token_id,
            logprob=lp.logprob,
            token_bytes=served.token_bytes(lp.token_id),
            top=[
                llm_pb2.TopLogprob(token=served.token_text(i), id=i, logprob=v, token_bytes=served.token_bytes(i))
                for i, v in lp.top
            ],
        )
        for lp in logprobs
    ]


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(
        self,
        host: ModelHost[ServedLLM],
        embedders: ModelHost[ServedEmbedder] | None = None,
        store: AdapterStore | None = None,
    ):
        self.host = host
        self.embedders = embedders
        self.store = store  # where an adapter's base model is looked up when a request names no model
        self._events = EventRelay()

    async def _generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[ServedLLM, GenerationEvent]]:
        events, sink = self._events.sink()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        # reading the adapter's metadata and tokenizing a long prompt must not stall the event loop
        served, seq = await asyncio.to_thread(self._sequence, request, sink, deadline)
        served.engine.submit(seq)
        async for event in self._events.follow(events, seq.cancel):
            yield served, event

    def _sequence(self, request: llm_pb2.GenerateRequest, sink, deadline: float | None) -> tuple[ServedLLM, Sequence]:
        served, info = self._target(request)
        seq = served.new_sequence(
            prompt=request.prompt,
            messages=[turn_from_proto(m) for m in request.messages],
            adapter=request.adapter,
            adapter_info=info,
            sampling=sampling_from_proto(request.sampling),
            response_format=format_from_proto(request),
            tools=parse_tools([(t.name, t.description, t.parameters) for t in request.tools]),
            tool_choice=tool_choice_from_proto(request),
            on_event=sink,
            deadline=deadline,
        )
        return served, seq

    def _target(self, request: llm_pb2.GenerateRequest) -> tuple[ServedLLM, AdapterInfo | None]:
        """The model a request runs on: the one it names; with only an adapter named, the adapter's base."""
        if request.model or not request.adapter or self.store is None:
            return self.host.get(request.model), None
        info = self.store.get(request.adapter)
        for entry, _ in self.host.entries():
            if info.base_model in (entry.name, entry.source):
                return self.host.get(entry.name), info
        raise FailedPrecondition(
            f"adapter {info.name!r} was trained on base model {info.base_model!r}, which this server does not serve "
            f"(served llm models: {', '.join(self.host.registry.names)})"
        )

    def _calls_of(self, request: llm_pb2.GenerateRequest, served: ServedLLM) -> ToolCallStream | None:
        """A reader of tool calls when the request offers tools, else None."""
        if not request.tools or tool_choice_from_proto(request).mode == "none":
            return None
        return ToolCallStream(served.tool_format)

    async def Generate(self, request, context):
        pieces, logprobs, calls, reader = [], [], [], None
        async for served, event in self._generate(request, context):
            reader = reader or self._calls_of(request, served)
            text, done = reader.feed(event.text) if reader else (event.text, [])
            pieces.append(text)
            calls.extend(done)
            logprobs.extend(event.logprobs)
        text = "".join(pieces) + (reader.flush() if reader else "")
        return llm_pb2.GenerateResponse(
            text="" if calls and text.isspace() else text,
            finish_reason=llm_pb2.FINISH_REASON_TOOL_CALLS if calls else _FINISH_REASONS[event.finish_reason],
            usage=llm_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
            seed=event.seed,
            logprobs=logprobs_to_proto(served, tuple(logprobs)),
            tool_calls=calls_to_proto(calls),
        )

    async def GenerateStream(self, request, context):
        reader, called = None, False
        async for served, event in self._generate(request, context):
            reader = reader or self._calls_of(request, served)
            text, calls = reader.feed(event.text) if reader else (event.text, [])
            if event.final and reader:
                text += reader.flush()
            called = called or bool(calls)
            message = llm_pb2.GenerateStreamResponse(
                text=text, logprobs=logprobs_to_proto(served, event.logprobs), tool_calls=calls_to_proto(calls)
            )
            if event.final:
                reason = llm_pb2.FINISH_REASON_TOOL_CALLS if called else _FINISH_REASONS[event.finish_reason]
                message.finish_reason = reason
                message.usage.prompt_tokens = event.prompt_tokens
                message.usage.completion_tokens = event.completion_tokens
                message.seed = event.seed
            yield message

    async def Tokenize(self, request, context):
        served = self.host.get(request.model)
        return llm_pb2.TokenizeResponse(ids=await asyncio.to_thread(served.encode_prompt, request.text))

    async def ListModels(self, request, context):
        default = self.host.registry.default_name
        models = []
        adapters = await asyncio.to_thread(self._llm_adapters)
        for entry, served in self.host.entries():
            info = llm_pb2.ModelInfo(
                name=entry.name,
                kind=entry.kind,
                source=entry.source,
                is_default=entry.name == default,
                quantization=entry.quantization,
            )
            if served is not None:
                info.max_context_length = served.context_length
                info.max_new_tokens_limit = served.limits.max_new_tokens_limit
                info.dtype, info.dtype_reason = served.dtype, served.dtype_reason
                info.device = str(served.device)
                info.weight_bytes = served.weight_bytes
            info.adapters.extend(a.name for a in adapters if a.base_model in (entry.name, entry.source))
            models.append(info)
        for entry, embedder in self.embedders.entries() if self.embedders else ():
            info = llm_pb2.ModelInfo(
                name=entry.name,
                kind=entry.kind,
                source=entry.source,
                is_default=entry.name == self.embedders.registry.default_name,
                quantization=entry.quantization,
            )
            if embedder is not None:
                info.max_context_length = embedder.max_input_tokens
                info.dtype, info.dtype_reason = embedder.dtype, embedder.dtype_reason
                info.device = str(embedder.device)
                info.weight_bytes = embedder.weight_bytes
            models.append(info)
        return llm_pb2.ListModelsResponse(models=models)

    def _llm_adapters(self) -> list[AdapterInfo]:
        return [a for a in self.store.list() if a.kind == "llm"] if self.store is not None else []

    async def Embed(self, request, context):
        if self.embedders is None:
            raise NotFound("this server hosts no embedding models")
        embedder = self.embedders.get(request.model)
        job = await asyncio.to_thread(  # tokenizing many texts must not stall the event loop
            embedder.new_job,
            list(request.inputs),
            _POOLINGS.get(request.pooling, f"unknown pooling {request.pooling}"),
            request.normalize if request.HasField("normalize") else None,
            request.dimensions,
        )
        embedder.engine.submit(job)
        try:
            vectors = await asyncio.wrap_future(job.done)
        except asyncio.CancelledError:
            job.cancel()
            raise
        return llm_pb2.EmbedResponse(
            embeddings=[llm_pb2.Embedding(values=row) for row in vectors.tolist()],
            model=embedder.entry.name,
            usage=llm_pb2.Usage(prompt_tokens=job.tokens),
        )
