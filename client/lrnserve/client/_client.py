"""The blocking client."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._base import BaseClient, Operation
from ._config import open_channel
from ._errors import LrnserveError, error_from_rpc
from ._same_host import SameHost, answer_bytes, discard, register_op, unregister_op
from ._stream import STREAM_METHOD, StreamResult, StreamSession
from ._tensors import encode, lrn_parameters
from ._types import ModelMetadata, ModelStatistics, ServerMetadata
from .pb import grpc_predict_v2_pb2 as pb
from .protocol import method

T = TypeVar("T")


class Client(BaseClient["grpc.UnaryUnaryMultiCallable[Any, Any]"]):  # quoted: grpc's class is not generic at run time
    """A blocking client for lrnserve (any Open Inference Protocol v2 gRPC server).

    >>> with Client("localhost:8001", timeout=10) as client:
    ...     y = client.lrn(x, size=5, alpha=1e-4)
    """

    def __init__(self, target: Any, *, same_host: bool = False, **options: Any) -> None:
        """``same_host``: pass tensors through system shared memory (``_same_host``) to a server on
        this machine started with ``--allow-shared-memory``; other options as ``BaseClient``'s."""
        super().__init__(target, **options)
        self._channel: grpc.Channel = open_channel(
            self.target, self.options, self._credentials(), self.compression, aio=False
        )
        self._same_host = SameHost() if same_host else None
        self._same_host_lock = threading.Lock()
        self._metadata_of: dict[str, ModelMetadata] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._same_host is not None:
            with self._same_host_lock:
                self._forget_regions()
        self._channel.close()

    def _run(self, op: Operation[T], timeout: float | None) -> T:
        """``op`` to its result; Attempts decides retries and deadline, this only blocks and sleeps."""
        call, attempts = self._callable(op), self._attempts(timeout)
        while True:
            try:
                return op.result(call(op.request, timeout=attempts.remaining(), metadata=self._call_metadata))
            except grpc.RpcError as exc:
                time.sleep(attempts.backoff(exc))

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

    def infer(
        self, model: str, x: Any, *, timeout: float | None = None, input_name: str | None = None, **parameters: Any
    ) -> Any:
        """Run ``model`` on ``x`` (NCHW, or CHW for one sample) with request ``parameters``.

        ``input_name``: the model's input tensor; by default learnt once from its metadata.
        numpy results are read-only views of the response bytes (``np.array(y)`` copies)."""
        name = input_name or self._input_names.get(model) or self._input_name(model, timeout)
        if self._same_host is not None:
            return self._infer_same_host(model, x, parameters, name, timeout)
        return self._run(self._infer(model, x, parameters, name), timeout)

    def _infer_same_host(
        self, model: str, x: Any, parameters: dict[str, Any], input_name: str, timeout: float | None
    ) -> Any:
        assert self._same_host is not None
        metadata = self._metadata_of.get(model)
        if metadata is None:
            metadata = self._metadata_of[model] = self.metadata(model, timeout=timeout)
        request, decoder = encode(model, x, parameters, input_name)
        raw = request.raw_input_contents.pop()  # it goes to shared memory, not in the message
        sizes = {
            "input": len(raw),
            "output": answer_bytes(metadata, tuple(request.inputs[0].shape), request.inputs[0].datatype),
        }
        with self._same_host_lock:
            for attempt in range(2):
                try:
                    for role, nbytes in sizes.items():
                        self._fit_region(role, nbytes, timeout)
                    placed, shared = self._same_host.place(request, raw, decoder, metadata.outputs[0].name)
                    operation = Operation(method("ModelInfer"), placed, pb.ModelInferResponse, shared.decode)
                    return self._run(operation, timeout)
                except LrnserveError as exc:
                    # The server may still write a late answer into these regions, or has lost them
                    # (restarted): start afresh with new ones, and retry once if they were lost.
                    self._forget_regions()
                    if attempt or "no shared memory region" not in exc.details:
                        raise
        raise AssertionError("unreachable")

    def _fit_region(self, role: str, nbytes: int, timeout: float | None) -> None:
        assert self._same_host is not None
        if self._same_host.fits(role, nbytes):
            return
        segment = self._same_host.make(role, nbytes)
        try:
            self._run(register_op(segment), timeout)
        except BaseException:
            discard(segment)
            raise
        for replaced in self._same_host.adopt(role, segment):
            with contextlib.suppress(LrnserveError):
                self._run(unregister_op(replaced), timeout)

    def _forget_regions(self) -> None:
        assert self._same_host is not None
        for name in self._same_host.forget():
            with contextlib.suppress(LrnserveError):  # a server that is gone has nothing to give back
                self._run(unregister_op(name), 10.0)

    def infer_stream(
        self,
        model: str,
        inputs: Iterable[Any],
        *,
        timeout: float | None = None,
        input_name: str | None = None,
        **parameters: Any,
    ) -> Iterator[StreamResult]:
        """Run ``model`` on each of ``inputs`` over one ModelStreamInfer stream, sending them as
        they are read; yields a ``StreamResult`` per input as each finishes (any order, with its
        position). A failed request does not end the stream. ``timeout``: a deadline for the
        whole stream (default none); a stream is not retried. Iterating further after an error
        of the stream itself (e.g. UNAVAILABLE on a drain) raises it."""
        name = input_name or self._input_names.get(model) or self._input_name(model, None)
        session = StreamSession(model, parameters, name)
        call = self._channel.stream_stream(
            STREAM_METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = call(session.requests(inputs), timeout=timeout, metadata=self._call_metadata)
        try:
            for response in answers:
                yield session.answer(response)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            answers.cancel()  # a caller that stops iterating early ends the stream

    def classify(self, model: str, images: Any, *, top: int = 5, timeout: float | None = None) -> Any:
        """Each image's ``top`` classes, best first, as ``Classification(label, index, score)``
        (label None when the model has no labels): a list per image of an NCHW batch, one list
        for a CHW image. The server picks them (the classification extension)."""
        names = self._known_names(model) or self._learn_names(model, self.metadata(model, timeout=timeout))
        return self._run(self._classify(model, images, top, *names), timeout)

    def _input_name(self, model: str, timeout: float | None) -> str:
        try:
            metadata: ModelMetadata | None = self.metadata(model, timeout=timeout)
        except LrnserveError:
            metadata = None
        return self._learn_input_name(model, metadata)

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
        if self._same_host is not None:
            return self._infer_same_host(model, x, lrn_parameters(mode, size, alpha, beta, k), "input", timeout)
        return self._run(self._lrn(x, model, mode, size, alpha, beta, k), timeout)
