"""The Open Inference Protocol v2 servicer and the one place errors become statuses.

The servicer only converts (``codec``) and delegates (``DataPlane``).
``Guarded`` wraps every RPC of a service: a ``ServingError`` becomes its
status and message; anything unexpected is logged with its traceback and
answered INTERNAL with a generic message. (A wrapper rather than a server
interceptor: grpc.aio runs interceptors as an extra coroutine per call, which
cost about a tenth of the server's throughput on small requests.) Request
outcomes are the data plane's to report, not the transport's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc

from ..dataplane import DataPlane
from ..errors import PermissionDenied, ServingError
from . import codec, repository_codec
from .streaming import StreamInfer
from .wire import InferRequestWire

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs: protobuf in, one data plane call, protobuf out."""

    def __init__(
        self,
        dataplane: DataPlane,
        max_stream_inflight: int = 64,
        max_open_streams: int = 16,
        on_stream_change: Callable[[], None] | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.streams = StreamInfer(self._infer, max_stream_inflight, max_open_streams, on_stream_change)

    async def _infer(self, request: InferRequestWire, context: Context) -> bytes:
        inference = codec.request_from_wire(
            request, context.time_remaining(), lambda: codec.is_local_peer(context.peer())
        )
        return codec.response_to_wire(await self.dataplane.infer(inference))

    @staticmethod
    def _same_host(context: Context) -> None:
        """Shared memory is for callers on this host: a region names a file of this machine."""
        if not codec.is_local_peer(context.peer()):
            raise PermissionDenied("system shared memory is only for callers on the server's host")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return codec.server_metadata_to_proto(self.dataplane.server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return codec.model_metadata_to_proto(self.dataplane.model_metadata(request.name, request.version))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return codec.model_config_to_proto(self.dataplane.model_config(request.name, request.version))

    async def ModelInfer(self, request: InferRequestWire, context: Context) -> bytes:  # type: ignore[override]
        """Registered by ``wire.add_inference_service``: a partly parsed request in, the
        serialized response out."""
        return await self._infer(request, context)

    async def ModelStreamInfer(self, requests: Any, context: Context) -> None:  # type: ignore[override]
        """Registered by ``wire.add_inference_service`` (``streaming``): answers are written to
        ``context`` as each request finishes."""
        await self.streams(requests, context)

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        self._same_host(context)
        return codec.shared_memory_status_to_proto(self.dataplane.shared_memory.status(request.name))

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._same_host(context)
        self.dataplane.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._same_host(context)
        self.dataplane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        return codec.statistics_to_proto(self.dataplane.statistics(request.name, request.version))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return repository_codec.index_to_proto(self.dataplane.repository_index(request.ready))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        load = repository_codec.load_from_proto(request, self.dataplane.repository_root)
        await self.dataplane.load_model(load.model, load.config, load.files)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload_model(repository_codec.model_name(request, self.dataplane.repository_root))
        return pb.RepositoryModelUnloadResponse()


Unary = Callable[[Any, "Context"], Awaitable[Any]]
Streaming = Callable[[Any, "Context"], AsyncIterator[Any]]


def _status_for(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"


class Guarded:
    """A servicer whose every RPC maps exceptions to statuses: the one place that does.

    Wraps each coroutine method (unary RPCs) and async-generator method (server
    streaming) of ``servicer`` once, when the generated ``add_*_to_server``
    looks it up, so no RPC of a guarded service can be left out.
    """

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        path = f"{type(self._servicer).__name__}.{name}"
        if inspect.isasyncgenfunction(method):
            wrapped: Any = _wrap_stream(path, method)
        elif inspect.iscoroutinefunction(method):
            wrapped = _wrap_unary(path, method)
        else:
            return method
        setattr(self, name, wrapped)  # later lookups skip __getattr__
        return wrapped


# Both wrappers abort *after* their except block. An exception raised inside one carries the
# caught exception as its __context__, whose traceback holds the frames of the whole call and so
# the request's buffers; gRPC keeps the abort exception on the call, which made a reference cycle
# that pinned every refused request's message until a full garbage collection.


class QuietDepartures(logging.Filter):
    """gRPC logs an ERROR with a traceback when a handler answers a call whose caller already
    left (the deadline passed, or the peer went away, between the handler's last look and the
    send). That is an ordinary event, not a server fault: keep it at debug level."""

    MESSAGE = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.MESSAGE):
            return True
        logger.debug("a caller left before its answer could be sent (%s)", record.getMessage())
        return False


def quiet_departures() -> None:
    """Install ``QuietDepartures`` on gRPC's server logger (once)."""
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, QuietDepartures) for f in grpc_logger.filters):
        grpc_logger.addFilter(QuietDepartures())


def _caller_gone(context: Context) -> bool:
    """The call ended on the caller's side (cancelled, or past its deadline): nothing can be sent."""
    remaining = context.time_remaining()
    return context.done() or (remaining is not None and remaining <= 0)


def _wrap_unary(method: str, inner: Unary) -> Unary:
    async def call(request: Any, context: Context) -> Any:
        try:
            response = await inner(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = _status_for(exc, method)
        else:
            if not _caller_gone(context):
                return response
            code, message = grpc.StatusCode.OK, ""
        del request
        if _caller_gone(context):
            # Answering a call whose caller left fails inside gRPC, which logs it as an error;
            # it is an ordinary event (the data plane counted its outcome), so end quietly.
            logger.debug("%s: the caller left before its answer (%s)", method, code.name)
            raise asyncio.CancelledError
        await context.abort(code, message)

    return call


def _wrap_stream(method: str, inner: Streaming) -> Streaming:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in inner(request, context):
                yield item
            return
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = _status_for(exc, method)
        del request
        if _caller_gone(context):
            logger.debug("%s: the caller left before its answer (%s)", method, code.name)
            raise asyncio.CancelledError
        await context.abort(code, message)

    return call
