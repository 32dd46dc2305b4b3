"""The Open Inference Protocol v2 servicer and the one place errors become statuses.

The servicer only converts (``codec``) and delegates (``DataPlane``). The
``ErrorInterceptor`` wraps every RPC of every service: a ``ServingError``
becomes its status and message; anything unexpected is logged with its
traceback and answered INTERNAL with a generic message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc

from ..dataplane import DataPlane
from ..errors import ServingError
from . import codec

logger = logging.getLogger(__name__)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

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

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        inference = codec.request_from_proto(request, context.time_remaining())
        return codec.response_to_proto(await self.dataplane.infer(inference))


Unary = Callable[[Any, "Context"], Awaitable[Any]]
Streaming = Callable[[Any, "Context"], AsyncIterator[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


async def _abort_for(exc: Exception, method: str, context: Context) -> None:
    if isinstance(exc, ServingError):
        await context.abort(exc.code, exc.message)
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error; the server log has the details")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to gRPC statuses for every unary and server-streaming RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        # The aio server's handlers are coroutine functions and async generators, whatever
        # the (sync) type stubs say; RpcMethodHandler is a namedtuple.
        replace = cast(Any, handler)._replace
        if handler.unary_unary is not None:
            return cast(Handler, replace(unary_unary=self._wrap_unary(method, cast(Unary, handler.unary_unary))))
        if handler.unary_stream is not None:
            return cast(Handler, replace(unary_stream=self._wrap_stream(method, cast(Streaming, handler.unary_stream))))
        return handler

    @staticmethod
    def _wrap_unary(method: str, inner: Unary) -> Unary:
        async def call(request: Any, context: Context) -> Any:
            try:
                return await inner(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await _abort_for(exc, method, context)

        return call

    @staticmethod
    def _wrap_stream(method: str, inner: Streaming) -> Streaming:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in inner(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await _abort_for(exc, method, context)

        return call
