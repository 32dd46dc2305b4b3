"""The asyncio client: the same API as Client, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._base import BaseClient, Operation
from ._config import open_channel
from ._errors import LrnserveError, error_from_rpc
from ._stream import STREAM_METHOD, StreamResult, StreamSession
from ._types import ModelMetadata, ModelStatistics, ServerMetadata
from .pb import grpc_predict_v2_pb2 as pb

T = TypeVar("T")


class AsyncClient(BaseClient["grpc.aio.UnaryUnaryMultiCallable[Any, Any]"]):  # quoted: not generic at run time
    """An asyncio client for lrnserve; create and use it inside a running event loop.

    >>> async with AsyncClient("localhost:8001") as client:
    ...     y = await client.lrn(x, size=5)
    """

    def __init__(self, target: Any, **options: Any) -> None:
        super().__init__(target, **options)
        self._channel: grpc.aio.Channel = open_channel(
            self.target, self.options, self._credentials(), self.compression, aio=True
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, op: Operation[T], timeout: float | None) -> T:
        """``op`` to its result; Attempts decides retries and deadline, this only awaits and sleeps."""
        call, attempts = self._callable(op), self._attempts(timeout)
        while True:
            try:
                return op.result(await call(op.request, timeout=attempts.remaining(), metadata=self._call_metadata))
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.backoff(exc))

    # ---- the API (see Client for the documentation) ----

    async def live(self, *, timeout: float | None = None) -> bool:
        return await self._run(self._live(), timeout)

    async def ready(self, model: str | None = None, *, timeout: float | None = None) -> bool:
        return await self._run(self._ready(model), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        return await self._run(self._health(service), timeout)

    async def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return await self._run(self._server_metadata(), timeout)

    async def metadata(self, model: str, *, timeout: float | None = None) -> ModelMetadata:
        return await self._run(self._metadata(model), timeout)

    async def statistics(self, model: str, *, timeout: float | None = None) -> ModelStatistics:
        return await self._run(self._statistics(model), timeout)

    async def infer(
        self, model: str, x: Any, *, timeout: float | None = None, input_name: str | None = None, **parameters: Any
    ) -> Any:
        name = input_name or self._input_names.get(model) or await self._input_name(model, timeout)
        return await self._run(self._infer(model, x, parameters, name), timeout)

    async def infer_stream(
        self,
        model: str,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        timeout: float | None = None,
        input_name: str | None = None,
        **parameters: Any,
    ) -> AsyncIterator[StreamResult]:
        """``Client.infer_stream``, awaited: ``inputs`` may also be an async iterable."""
        name = input_name or self._input_names.get(model) or await self._input_name(model, None)
        session = StreamSession(model, parameters, name)
        requests = session.async_requests(inputs) if isinstance(inputs, AsyncIterable) else session.requests(inputs)
        call = self._channel.stream_stream(
            STREAM_METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = call(requests, timeout=timeout, metadata=self._call_metadata)
        try:
            async for response in answers:
                yield session.answer(response)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            answers.cancel()

    async def classify(self, model: str, images: Any, *, top: int = 5, timeout: float | None = None) -> Any:
        names = self._known_names(model) or self._learn_names(model, await self.metadata(model, timeout=timeout))
        return await self._run(self._classify(model, images, top, *names), timeout)

    async def _input_name(self, model: str, timeout: float | None) -> str:
        try:
            metadata: ModelMetadata | None = await self.metadata(model, timeout=timeout)
        except LrnserveError:
            metadata = None
        return self._learn_input_name(model, metadata)

    async def lrn(
        self,
        x: Any,
        *,
        mode: str = "across",
        size: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        k: float | None = None,
        model: str = "lrn",
        timeout: float | None = None,
    ) -> Any:
        return await self._run(self._lrn(x, model, mode, size, alpha, beta, k), timeout)
