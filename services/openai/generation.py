"""The n generations of one chat or text completion: unary calls gathered, or streams merged in arrival order.

A stream's first messages are read before the HTTP response starts, so a request the LLM service refuses
gets its 4xx status, not a 200 whose body carries the error. Cancelling (the client went away) cancels every
gRPC call, which frees their slots in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc

from modelworks.llm.v1 import llm_pb2
from services.openai.clients import Metadata, ServiceClients
from services.openai.errors import from_rpc_error

SERVICE = "LLM"


async def generate(
    clients: ServiceClients, requests: Sequence[llm_pb2.GenerateRequest], metadata: Metadata
) -> list[llm_pb2.GenerateResponse]:
    calls = [clients.llm.Generate(request, metadata=metadata) for request in requests]
    try:
        return list(await asyncio.gather(*calls))
    except grpc.RpcError as error:
        raise from_rpc_error(error, SERVICE) from None
    finally:  # one failed, or the client went away: the others stop too
        for pending in calls:
            pending.cancel()


class Streams:
    """The GenerateStream calls of one request, each with its first message already read."""

    def __init__(self, calls: list, firsts: list):
        self._calls = calls
        self._firsts = firsts

    @classmethod
    async def start(
        cls, clients: ServiceClients, requests: Sequence[llm_pb2.GenerateRequest], metadata: Metadata
    ) -> Streams:
        calls = [clients.llm.GenerateStream(request, metadata=metadata) for request in requests]
        try:
            firsts = list(await asyncio.gather(*(c.read() for c in calls)))
        except grpc.RpcError as error:
            cls(calls, []).cancel()
            raise from_rpc_error(error, SERVICE) from None
        except BaseException:
            cls(calls, []).cancel()
            raise
        return cls(calls, firsts)

    def cancel(self) -> None:
        for pending in self._calls:
            pending.cancel()

    async def messages(self) -> AsyncIterator[tuple[int, llm_pb2.GenerateStreamResponse]]:
        """(choice index, message) as they arrive; a gRPC failure is raised as it is."""
        if len(self._calls) == 1:
            async for message in self._one(0):
                yield 0, message
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self._calls))]
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _one(self, index: int) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
        message = self._firsts[index]
        while message is not grpc.aio.EOF:
            yield message
            message = await self._calls[index].read()

    async def _pump(self, index: int, queue: asyncio.Queue) -> None:
        try:
            async for message in self._one(index):
                await queue.put((index, message))
        except grpc.RpcError as error:
            await queue.put(error)
        await queue.put(None)
