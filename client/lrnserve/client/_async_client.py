"""The asyncio client: the same API as Client, awaited."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._base import BaseClient, Operation
from ._errors import DeadlineExceeded, error_from_rpc
from ._types import ModelMetadata, ModelStatistics, ServerMetadata

T = TypeVar("T")


class AsyncClient(BaseClient):
    """An asyncio client for lrnserve; create and use it inside a running event loop.

    >>> async with AsyncClient("localhost:8001") as client:
    ...     y = await client.lrn(x, size=5)
    """

    def __init__(self, target: Any, **options: Any) -> None:
        super().__init__(target, **options)
        credentials = self._credentials()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self.options, compression=self.compression)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, credentials, options=self.options, compression=self.compression
            )
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _callable(self, op: Operation[Any]) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        call = self._callables.get(op.method)
        if call is None:
            call = self._channel.unary_unary(
                op.method,
                request_serializer=type(op.request).SerializeToString,
                response_deserializer=op.response_type.FromString,
            )
            self._callables[op.method] = call
        return call

    async def _run(self, op: Operation[T], timeout: float | None) -> T:
        timeout = self._timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        call = self._callable(op)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"deadline of {timeout}s passed before the call could be made")
            try:
                return op.result(await call(op.request, timeout=remaining, metadata=self._call_metadata))
            except grpc.RpcError as exc:
                delay = next(delays, None) if self.retry.retryable(exc.code()) else None
                if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                    raise error_from_rpc(exc) from exc
                await asyncio.sleep(delay)

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

    async def infer(self, model: str, x: Any, *, timeout: float | None = None, **parameters: Any) -> Any:
        return await self._run(self._infer(model, x, parameters), timeout)

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
