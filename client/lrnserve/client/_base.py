"""What Client and AsyncClient share: settings, channel set-up, retries, and every operation as data.

Each public method is an ``Operation``: which RPC to call, the request message,
and how to turn the reply into the return value. The two clients differ only
in how they run an operation (blocking or awaiting) and sleep between retries;
``Attempts`` decides everything else about a call's retries and deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc

from ._config import TLS, Retry, channel_options, channel_target, compression_of, retry_policy
from ._errors import DeadlineExceeded, error_from_rpc
from ._tensors import encode, encode_classify, lrn_parameters
from ._types import ModelMetadata, ModelStatistics, ServerMetadata
from .pb import grpc_predict_v2_pb2 as pb
from .pb import health_pb2
from .protocol import DEFAULT_MAX_MESSAGE_BYTES, method

T = TypeVar("T")
Call = TypeVar("Call")  # what the channel makes of a method: grpc's or grpc.aio's UnaryUnaryMultiCallable
Call_co = TypeVar("Call_co", covariant=True)

HEALTH = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Operation(Generic[T]):
    method: str  # full gRPC method path
    request: Any  # a protobuf message
    response_type: Any  # the reply message class
    result: Callable[[Any], T]


class Channel(Protocol[Call_co]):
    """What BaseClient needs of a channel; grpc.Channel and grpc.aio.Channel both are one."""

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = ...,
        response_deserializer: Callable[[bytes], Any] | None = ...,
    ) -> Call_co: ...


class Attempts:
    """One call's attempts: the time left before its deadline, and whether a failure is retried.

    Blocking and awaited calls share it, so both retry and give up in exactly the same way."""

    def __init__(self, retry: Retry, timeout: float | None) -> None:
        self.retry = retry
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delays = retry.delays()

    def remaining(self) -> float | None:
        """The timeout for the next attempt (None: no deadline); DeadlineExceeded when no time is left."""
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline of {self.timeout}s passed before the call could be made")
        return remaining

    def backoff(self, exc: grpc.RpcError) -> float:
        """How long to sleep before retrying after ``exc``; raises its LrnserveError when the call is
        not retried (a status not to retry, no attempts left, or the sleep would pass the deadline)."""
        delay = next(self.delays, None) if self.retry.retryable(exc.code()) else None
        if delay is None or (self.deadline is not None and time.monotonic() + delay >= self.deadline):
            raise error_from_rpc(exc) from exc
        return delay


class BaseClient(Generic[Call]):
    """``Call`` is the multi-callable type of the subclass's channel (blocking or asyncio)."""

    _channel: Channel[Call]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        retries: int | Retry = 3,
        tls: TLS | None = None,
        token: str | None = None,
        compression: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """``target``: 'host:port', a gRPC URI such as 'dns:///lrnserve.default:8001', or a list
        of 'host:port' balanced round-robin. ``timeout``: default per-call deadline in seconds
        (None: none). ``retries``: extra attempts on UNAVAILABLE (or a ``Retry``). ``token`` is
        sent as 'authorization: Bearer <token>'. ``compression``: None, 'gzip' or 'deflate'."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.target = channel_target(target)
        self.timeout = timeout
        self.retry = retry_policy(retries)
        self.tls = tls
        self.compression = compression_of(compression)
        self._call_metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.options = channel_options(max_message_bytes, tls)
        self._callables: dict[str, Call] = {}
        # Each model's input tensor name, learnt from its metadata on first use: model files keep
        # their own names ("data", "data_0"), the built-in models take "input".
        self._input_names: dict[str, str] = {}
        self._output_names: dict[str, str] = {}  # the same for outputs, for ``classify``

    def _credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.credentials() if self.tls is not None else None

    def _attempts(self, timeout: float | None) -> Attempts:
        """The attempts of one call, with this client's default timeout unless the call gives one."""
        return Attempts(self.retry, self.timeout if timeout is None else timeout)

    def _callable(self, op: Operation[Any]) -> Call:
        """The channel's callable for ``op``'s method, made once per method and reused."""
        call = self._callables.get(op.method)
        if call is None:
            call = self._channel.unary_unary(
                op.method,
                request_serializer=type(op.request).SerializeToString,
                response_deserializer=op.response_type.FromString,
            )
            self._callables[op.method] = call
        return call

    # ---- operations ----

    @staticmethod
    def _live() -> Operation[bool]:
        return Operation(method("ServerLive"), pb.ServerLiveRequest(), pb.ServerLiveResponse, lambda r: r.live)

    @staticmethod
    def _ready(model: str | None) -> Operation[bool]:
        if model is None:
            return Operation(method("ServerReady"), pb.ServerReadyRequest(), pb.ServerReadyResponse, lambda r: r.ready)
        return Operation(
            method("ModelReady"), pb.ModelReadyRequest(name=model), pb.ModelReadyResponse, lambda r: r.ready
        )

    @staticmethod
    def _health(service: str) -> Operation[bool]:
        serving = health_pb2.HealthCheckResponse.SERVING
        return Operation(
            HEALTH,
            health_pb2.HealthCheckRequest(service=service),
            health_pb2.HealthCheckResponse,
            lambda r: r.status == serving,
        )

    @staticmethod
    def _server_metadata() -> Operation[ServerMetadata]:
        return Operation(
            method("ServerMetadata"), pb.ServerMetadataRequest(), pb.ServerMetadataResponse, ServerMetadata.from_proto
        )

    @staticmethod
    def _metadata(model: str) -> Operation[ModelMetadata]:
        return Operation(
            method("ModelMetadata"),
            pb.ModelMetadataRequest(name=model),
            pb.ModelMetadataResponse,
            ModelMetadata.from_proto,
        )

    @staticmethod
    def _statistics(model: str) -> Operation[ModelStatistics]:
        def first(response: pb.ModelStatisticsResponse) -> ModelStatistics:
            return ModelStatistics.from_proto(response.model_stats[0])

        return Operation(
            method("ModelStatistics"), pb.ModelStatisticsRequest(name=model), pb.ModelStatisticsResponse, first
        )

    @staticmethod
    def _infer(model: str, x: Any, parameters: dict[str, Any], input_name: str = "input") -> Operation[Any]:
        request, decoder = encode(model, x, parameters, input_name)
        return Operation(method("ModelInfer"), request, pb.ModelInferResponse, decoder.decode)

    @staticmethod
    def _classify(model: str, x: Any, top: int, input_name: str, output_name: str) -> Operation[Any]:
        request, decoder = encode_classify(model, x, top, input_name, output_name)
        return Operation(method("ModelInfer"), request, pb.ModelInferResponse, decoder.decode)

    def _learn_names(self, model: str, metadata: ModelMetadata) -> tuple[str, str]:
        """The model's input and output names, for ``classify`` (it needs one output)."""
        if len(metadata.outputs) != 1:
            raise ValueError(f"model '{model}' has {len(metadata.outputs)} outputs; classify needs exactly one")
        self._output_names[model] = metadata.outputs[0].name
        return self._learn_input_name(model, metadata), metadata.outputs[0].name

    def _known_names(self, model: str) -> tuple[str, str] | None:
        if model in self._input_names and model in self._output_names:
            return self._input_names[model], self._output_names[model]
        return None

    def _learn_input_name(self, model: str, metadata: ModelMetadata | None) -> str:
        """The name to send; without metadata (lookup failed) the server's own answer to the
        request will say what is wrong."""
        if metadata is None:  # not remembered: a model loaded later is found next time
            return "input"
        # Remembered either way, so a model without exactly one input costs no lookup per request.
        name = metadata.inputs[0].name if len(metadata.inputs) == 1 else "input"
        self._input_names[model] = name
        return name

    @classmethod
    def _lrn(
        cls,
        x: Any,
        model: str,
        mode: str,
        size: int | None,
        alpha: float | None,
        beta: float | None,
        k: float | None,
    ) -> Operation[Any]:
        return cls._infer(model, x, lrn_parameters(mode, size, alpha, beta, k))
