"""Follow a server stream without ever blocking a Gradio generator for long.

Gradio stops a generator (the Stop button, a closed tab) by closing it, which must wait while the
generator is blocked in `next()`. Reading the stream on a helper thread and handing its messages over a
queue keeps the generator responsive: it wakes at least every `heartbeat_s`, and closing it cancels the
call, so the service frees the request's slot at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import grpc

T = TypeVar("T")
_END = object()


def follow(call: grpc.Call, heartbeat_s: float = 0.5) -> Iterator[T | None]:
    """Yield each message of the streaming `call`, and None after `heartbeat_s` without one.

    A failure of the call is raised here (as the `grpc.RpcError`); closing the iterator cancels the call."""
    inbox: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            for message in call:
                inbox.put(message)
            inbox.put(_END)
        except BaseException as error:  # always hand something over, or the reader would wait forever
            inbox.put(error)

    threading.Thread(target=pump, name="grpc-stream", daemon=True).start()
    try:
        while True:
            try:
                item = inbox.get(timeout=heartbeat_s)
            except queue.Empty:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        call.cancel()  # a no-op once the stream has ended
