"""ModelStreamInfer, Triton's streaming extension: many requests on one call.

Each message of the stream is a request of its own: charged to the in-flight byte budget on
receipt (its own lease, given back once its answer is handed to gRPC), then validated, batched,
computed and counted exactly as a ModelInfer call (the data plane does it). Each is answered as
soon as it is done, in any order, by a ``ModelStreamInferResponse`` carrying its ``id``; a
request that fails is answered with ``error_message`` (and its model and id) and the stream
goes on. A stream has no deadline per message: the protocol's ``timeout`` parameter is one, and
the stream's own deadline, if it has one, bounds them all.

- Back-pressure: at most ``max_stream_inflight`` requests of a stream are in flight (received,
  not yet handed to gRPC); its next message is read only when one is answered. A client that
  stops reading its answers therefore stalls only its own stream.
- A caller that cancels the stream cancels its requests: queued ones leave their model's queue
  without being computed.
- Drain: a stream open when the drain begins is read no further; its requests in flight are
  answered, then the stream ends with UNAVAILABLE.

Messages of streams are not received through the receive slots (a stream waits for its next
message for as long as its client likes, which a slot cannot hold); each open stream receives
one message at a time, and at most ``max_open_streams`` are open: a stream beyond them is
refused with RESOURCE_EXHAUSTED (README, "Memory").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

from ..errors import InvalidArgument, ResourceExhausted, ServingError, Unavailable
from .wire import InferRequestWire, length_delimited_key

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
# One request of the call ``context`` in, its serialized ModelInferResponse out (raises ServingError).
Infer = Callable[[InferRequestWire, Context], Awaitable[bytes]]
DRAINING = object()  # what ``_next`` returns once the drain began

INFER_RESPONSE_FIELD = pb.ModelStreamInferResponse.INFER_RESPONSE_FIELD_NUMBER


def stream_response(infer_response: bytes) -> bytes:
    """A ModelStreamInferResponse around a serialized ModelInferResponse, without parsing it."""
    return length_delimited_key(INFER_RESPONSE_FIELD, len(infer_response)) + infer_response


def stream_error(message: str, request: InferRequestWire | None) -> bytes:
    answer = pb.ModelStreamInferResponse(error_message=message)
    if request is not None:
        answer.infer_response.model_name = request.message.model_name
        answer.infer_response.model_version = request.message.model_version
        answer.infer_response.id = request.message.id
    return answer.SerializeToString()


class StreamInfer:
    """The ModelStreamInfer handler. Contract: used on the event loop thread that serves calls."""

    def __init__(self, infer: Infer, limit: int, max_open: int, on_change: Callable[[], None] | None = None) -> None:
        """``on_change`` hears whenever ``open`` (streams) or ``active`` (their requests in
        flight) changes: an open stream with nothing in flight is idle, not a call at work."""
        self._infer = infer
        self.limit = limit
        self.max_open = max_open
        self.open = 0
        self.active = 0
        self._on_change = on_change
        self._reads: set[asyncio.Task[Any]] = set()  # each open stream's pending read
        self.stopping = False

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def stop_reading(self) -> None:
        """The drain began: every open stream stops reading and ends once its answers are out."""
        self.stopping = True
        for read in list(self._reads):
            read.cancel()

    async def __call__(self, requests: Any, context: Context) -> None:
        if self.open >= self.max_open:
            raise ResourceExhausted(
                f"ModelStreamInfer: {self.open} streams are open, the limit (max_open_streams); "
                "retry later or use ModelInfer"
            )
        self.open += 1
        self._changed()
        try:
            await self._serve(context)
        finally:
            self.open -= 1
            self._changed()

    async def _serve(self, context: Context) -> None:
        in_flight = asyncio.Semaphore(self.limit)
        writing = asyncio.Lock()
        answering: set[asyncio.Task[None]] = set()

        def answered(task: asyncio.Task[None]) -> None:
            answering.discard(task)
            if not task.cancelled() and task.exception() is not None:  # the answer could not be sent
                logger.debug("ModelStreamInfer: an answer was not sent (%s)", task.exception())

        try:
            while True:
                await in_flight.acquire()
                request = await self._next(context)
                if request is None or request is DRAINING:
                    break
                assert isinstance(request, InferRequestWire)
                task = asyncio.create_task(self._answer(request, context, writing, in_flight))
                del request  # the task holds it, and lets go of it once answered
                answering.add(task)
                task.add_done_callback(answered)
            while answering:
                await asyncio.gather(*answering, return_exceptions=True)
        except BaseException:
            for task in answering:
                task.cancel()  # the caller left: its queued requests leave their queues uncomputed
            raise
        if request is DRAINING:
            # Raised, not aborted here: the wrapper (service.Guarded) aborts from a frame that
            # holds no task of this stream, which would otherwise keep the call alive (gRPC
            # keeps the abort exception, and with it this frame).
            raise Unavailable("server is shutting down; reopen the stream on another replica")

    async def _next(self, context: Context) -> object:
        """The stream's next request; None once the client closed it, DRAINING once the drain began."""
        if self.stopping:
            return DRAINING
        read = asyncio.ensure_future(context.read())
        self._reads.add(read)
        try:
            message = await read
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.stopping and read.cancelled() and not (current is not None and current.cancelling()):
                return DRAINING  # the drain cancelled the read, not the caller the call
            raise
        except DecodeError as exc:
            # Nothing can be answered for a message that is not one: end the stream.
            raise InvalidArgument(f"ModelStreamInfer: a message is not a ModelInferRequest ({exc})") from None
        finally:
            self._reads.discard(read)
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, InferRequestWire)
        return message

    async def _answer(
        self, request: InferRequestWire, context: Context, writing: asyncio.Lock, in_flight: asyncio.Semaphore
    ) -> None:
        lease = request.lease
        self.active += 1
        self._changed()
        try:
            try:
                answer = stream_response(await self._infer(request, context))
            except ServingError as exc:
                answer = stream_error(exc.message, request)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("ModelStreamInfer: a request failed unexpectedly")
                answer = stream_error("internal server error; the server log has the details", request)
            del request  # its input bytes are no longer needed
            async with writing:  # one write at a time on a call; blocks while the client does not read
                await context.write(answer)
        finally:
            if lease is not None:
                lease.release()
            in_flight.release()
            self.active -= 1
            self._changed()
