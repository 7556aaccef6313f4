"""The text routes: chat completions and text completions, unary or streamed."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from services.openai import chat, completions
from services.openai.context import Auth, Ctx
from services.openai.disconnect import unless_disconnected
from services.openai.generation import Streams, generate
from services.openai.sampling import FINISH_REASONS, usage
from services.openai.sse import event, sse_response

router = APIRouter()


async def _model_and_adapter(ctx: Ctx, model: str, adapter: str | None, metadata) -> tuple[str, str]:
    if adapter:  # ModelWorks' extra: an adapter named beside its base model
        base, _ = await ctx.catalog.resolve_llm(model, metadata)
        return base, adapter
    return await ctx.catalog.resolve_llm(model, metadata)


def _head(kind: str, body) -> dict:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()), "model": body.model}


def _total_usage(replies, n: int) -> dict:
    """A prompt's tokens count once however many choices it has (reply p * n + j is prompt p's choice j)."""
    prompt = sum(r.usage.prompt_tokens for r in replies[::n])
    return usage(prompt, sum(r.usage.completion_tokens for r in replies))


@router.post("/v1/chat/completions")
async def chat_completions(body: chat.ChatCompletionRequest, ctx: Ctx, metadata: Auth, request: Request):
    model, adapter = await _model_and_adapter(ctx, body.model, body.adapter, metadata)
    requests = chat.generate_requests(body, model, adapter)
    if body.stream:
        streams = await Streams.start(ctx.clients, requests, metadata)
        return sse_response(streams, _chat_chunks(streams, body, _head("chat.completion.chunk", body)))
    replies = await unless_disconnected(request, generate(ctx.clients, requests, metadata))
    choices = [chat.choice(i, reply, body.logprobs) for i, reply in enumerate(replies)]
    return _head("chat.completion", body) | {
        "choices": choices,
        "usage": _total_usage(replies, body.n),
        "system_fingerprint": None,
    }


async def _chat_chunks(streams: Streams, body: chat.ChatCompletionRequest, head: dict) -> AsyncIterator[bytes]:
    head = head | {"system_fingerprint": None} | ({"usage": None} if body.include_usage else {})
    for index in range(body.n):
        yield event(head | {"choices": [chat.delta_choice(index, {"role": "assistant", "content": ""})]})
    calls_sent = [0] * body.n
    prompt_tokens, completion_tokens = 0, 0
    async for index, message in streams.messages():
        delta = {"content": message.text} if message.text else {}
        if message.tool_calls:
            delta["tool_calls"] = chat.tool_calls(message.tool_calls, start=calls_sent[index], indexed=True)
            calls_sent[index] += len(message.tool_calls)
        if delta or message.logprobs:
            yield event(head | {"choices": [chat.delta_choice(index, delta, None, list(message.logprobs))]})
        if message.finish_reason:
            finish = FINISH_REASONS.get(message.finish_reason, "stop")
            yield event(head | {"choices": [chat.delta_choice(index, {}, finish)]})
            prompt_tokens += message.usage.prompt_tokens if index == 0 else 0
            completion_tokens += message.usage.completion_tokens
    if body.include_usage:
        yield event(head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)})


@router.post("/v1/completions")
async def text_completions(body: completions.CompletionRequest, ctx: Ctx, metadata: Auth, request: Request):
    completions.check_supported(body)
    model, adapter = await _model_and_adapter(ctx, body.model, body.adapter, metadata)
    requests = completions.generate_requests(body, model, adapter)
    prompts = [r.prompt for r in requests]
    if body.stream:
        streams = await Streams.start(ctx.clients, requests, metadata)
        return sse_response(streams, _completion_chunks(streams, body, prompts, _head("text_completion", body)))
    replies = await unless_disconnected(request, generate(ctx.clients, requests, metadata))
    choices = []
    for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        echoed = prompt if body.echo else ""
        entries = reply.logprobs if body.logprobs is not None else None
        choices.append(completions.choice(i, echoed + reply.text, reply.finish_reason, entries, len(echoed)))
    return _head("text_completion", body) | {"choices": choices, "usage": _total_usage(replies, body.n)}


async def _completion_chunks(streams: Streams, body, prompts: list[str], head: dict) -> AsyncIterator[bytes]:
    head = head | ({"usage": None} if body.include_usage else {})
    offsets = [len(p) if body.echo else 0 for p in prompts]
    if body.echo:
        for index, prompt in enumerate(prompts):
            yield event(head | {"choices": [completions.choice(index, prompt, None)]})
    prompt_tokens, completion_tokens = 0, 0
    async for index, message in streams.messages():
        entries = list(message.logprobs) if body.logprobs is not None else None
        if message.text or message.finish_reason or entries:
            choice = completions.choice(index, message.text, message.finish_reason, entries, offsets[index])
            yield event(head | {"choices": [choice]})
            offsets[index] += len(message.text)
        if message.finish_reason:
            prompt_tokens += message.usage.prompt_tokens if index % body.n == 0 else 0
            completion_tokens += message.usage.completion_tokens
    if body.include_usage:
        yield event(head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)})
