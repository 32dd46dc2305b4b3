"""Receiving ModelInfer messages a few at a time, so that what arrives is bounded.

A unary handler in gRPC Python only runs once its whole message has arrived: with many callers
sending large tensors, every one of those messages (twice, while gRPC turns it into bytes) is
held before the server can judge any of them. So ModelInfer is registered as a client-streaming
method, which is the same on the wire (a unary call is a stream of one message), and its handler
reads the message itself, after taking one of ``max_concurrent_receives`` slots. A call waiting
for a slot holds only what HTTP/2 flow control lets its client send ahead (the stream's window),
not its message. A slot is held until the message has arrived or ``receive_timeout_seconds``
passed, so callers that send slowly cannot keep the others waiting for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler = Callable[[Any, Context], Awaitable[Any]]


class ReceiveSlots:
    """Contract: used on the event loop thread that serves the calls."""

    def __init__(self, slots: int, timeout: float) -> None:
        self.slots = slots
        self.timeout = timeout
        self._free = asyncio.Semaphore(slots)
        self.waiting = 0  # calls waiting for a slot
        self.receiving = 0  # calls whose message is arriving

    def reading(self, handler: Handler) -> Callable[[Any, Context], Awaitable[Any]]:
        """A client-streaming behaviour that receives one message, then answers it with
        ``handler(message, context)`` (a unary servicer method)."""

        async def receive_then_handle(requests: Any, context: Context) -> Any:
            # The message is never bound here: the handler drops it before it answers with an
            # error, and an abort's traceback through this frame must not keep it alive.
            return await handler(await self._receive(context), context)

        return receive_then_handle

    async def _receive(self, context: Context) -> Any:
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        failure: tuple[grpc.StatusCode, str] | None = None
        self.receiving += 1
        try:
            async with asyncio.timeout(self.timeout):  # unlike wait_for, no task of its own per call
                message = await context.read()
        except TimeoutError:
            late = f"the request message did not arrive within receive_timeout_seconds ({self.timeout:g} s)"
            failure = grpc.StatusCode.DEADLINE_EXCEEDED, late
        except DecodeError as exc:
            failure = grpc.StatusCode.INVALID_ARGUMENT, f"the request message is not a ModelInferRequest ({exc})"
        finally:
            self.receiving -= 1
            self._free.release()
        # Aborting outside the except blocks: an exception raised in one would keep the
        # caught one, and with its traceback the received bytes, alive on the call.
        if failure is None and message is grpc.aio.EOF:
            failure = grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message"
        if failure is not None:
            await context.abort(failure[0], f"ModelInfer: {failure[1]}")
        return message
