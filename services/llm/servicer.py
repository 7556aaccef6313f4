"""gRPC servicer: translates `modelworks.llm.v1` messages to engine calls and back. No model code here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from services.llm.engine import FinishReason, GenerationEvent
from services.llm.params import SamplingRequest
from services.llm.served import ChatTurn, ServedLLM
from shared.aiobridge import EventRelay
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
    )


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, host: ModelHost[ServedLLM]):
        self.host = host
        self._events = EventRelay()

    async def _generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerationEvent]:
        served = self.host.get(request.model)
        events, sink = self._events.sink()
        remaining = context.time_remaining()
        seq = await asyncio.to_thread(  # tokenizing a long prompt must not stall the event loop
            served.new_sequence,
            prompt=request.prompt,
            messages=[ChatTurn(m.role, m.content) for m in request.messages],
            adapter=request.adapter,
            sampling=sampling_from_proto(request.sampling),
            on_event=sink,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )
        served.engine.submit(seq)
        async for event in self._events.follow(events, seq.cancel):
            yield event

    async def Generate(self, request, context):
        pieces = []
        async for event in self._generate(request, context):
            pieces.append(event.text)
        return llm_pb2.GenerateResponse(
            text="".join(pieces),
            finish_reason=_FINISH_REASONS[event.finish_reason],
            usage=llm_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
            seed=event.seed,
        )

    async def GenerateStream(self, request, context):
        async for event in self._generate(request, context):
            if not event.final:
                yield llm_pb2.GenerateStreamResponse(text=event.text)
                continue
            yield llm_pb2.GenerateStreamResponse(
                text=event.text,
                finish_reason=_FINISH_REASONS[event.finish_reason],
                usage=llm_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                seed=event.seed,
            )

    async def Tokenize(self, request, context):
        served = self.host.get(request.model)
        return llm_pb2.TokenizeResponse(ids=await asyncio.to_thread(served.encode_prompt, request.text))

    async def ListModels(self, request, context):
        default = self.host.registry.default_name
        models = []
        for entry, served in self.host.entries():
            info = llm_pb2.ModelInfo(
                name=entry.name, kind=entry.kind, source=entry.source, is_default=entry.name == default
            )
            if served is not None:
                info.max_context_length = served.context_length
                info.dtype = served.dtype
                info.device = str(served.device)
            models.append(info)
        return llm_pb2.ListModelsResponse(models=models)
