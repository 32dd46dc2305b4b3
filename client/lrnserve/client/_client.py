"""The blocking client."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._base import BaseClient, Operation
from ._errors import DeadlineExceeded, error_from_rpc
from ._types import ModelMetadata, ModelStatistics, ServerMetadata

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client for lrnserve (any Open Inference Protocol v2 gRPC server).

    >>> with Client("localhost:8001", timeout=10) as client:
    ...     y = client.lrn(x, size=5, alpha=1e-4)
    """

    def __init__(self, target: Any, **options: Any) -> None:
        super().__init__(target, **options)
        credentials = self._credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self.options, compression=self.compression)
        else:
            self._channel = grpc.secure_channel(
                self.target, credentials, options=self.options, compression=self.compression
            )
        self._callables: dict[str, grpc.UnaryUnaryMultiCallable[Any, Any]] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _callable(self, op: Operation[Any]) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        call = self._callables.get(op.method)
        if call is None:
            call = self._channel.unary_unary(
                op.method,
                request_serializer=type(op.request).SerializeToString,
                response_deserializer=op.response_type.FromString,
            )
            self._callables[op.method] = call
        return call

    def _run(self, op: Operation[T], timeout: float | None) -> T:
        timeout = self._timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retry.delays()
        call = self._callable(op)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"deadline of {timeout}s passed before the call could be made")
            try:
                return op.result(call(op.request, timeout=remaining, metadata=self._call_metadata))
            except grpc.RpcError as exc:
                delay = next(delays, None) if self.retry.retryable(exc.code()) else None
                if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                    raise error_from_rpc(exc) from exc
                time.sleep(delay)

    # ---- the API ----

    def live(self, *, timeout: float | None = None) -> bool:
        return self._run(self._live(), timeout)

    def ready(self, model: str | None = None, *, timeout: float | None = None) -> bool:
        """Whether the server (or one model) is ready for inference."""
        return self._run(self._ready(model), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """grpc.health.v1 Check: True when SERVING (service "" is the whole server)."""
        return self._run(self._health(service), timeout)

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return self._run(self._server_metadata(), timeout)

    def metadata(self, model: str, *, timeout: float | None = None) -> ModelMetadata:
        return self._run(self._metadata(model), timeout)

    def statistics(self, model: str, *, timeout: float | None = None) -> ModelStatistics:
        return self._run(self._statistics(model), timeout)

    def infer(self, model: str, x: Any, *, timeout: float | None = None, **parameters: Any) -> Any:
        """Run ``model`` on ``x`` (NCHW, or CHW for one sample) with request ``parameters``.

        numpy results are read-only views of the response bytes (``np.array(y)`` copies)."""
        return self._run(self._infer(model, x, parameters), timeout)

    def lrn(
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
        """LRN of ``x``; parameters left as None take the served model's defaults."""
        return self._run(self._lrn(x, model, mode, size, alpha, beta, k), timeout)
