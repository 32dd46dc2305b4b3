"""What Client and AsyncClient share: settings, channel set-up, and every operation as data.

Each public method is an ``Operation``: which RPC to call, the request message,
and how to turn the reply into the return value. The two clients differ only
in how they run an operation (blocking or awaiting) and sleep between retries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from ._config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TLS,
    Retry,
    channel_options,
    channel_target,
    compression_of,
    retry_policy,
)
from ._tensors import encode, lrn_parameters
from ._types import ModelMetadata, ModelStatistics, ServerMetadata
from .pb import grpc_predict_v2_pb2 as pb
from .pb import health_pb2

T = TypeVar("T")

SERVICE = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Operation(Generic[T]):
    method: str  # full gRPC method path
    request: Any  # a protobuf message
    response_type: Any  # the reply message class
    result: Callable[[Any], T]


class BaseClient:
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

    def _credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.credentials() if self.tls is not None else None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # ---- operations ----

    @staticmethod
    def _live() -> Operation[bool]:
        return Operation(SERVICE + "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse, lambda r: r.live)

    @staticmethod
    def _ready(model: str | None) -> Operation[bool]:
        if model is None:
            return Operation(
                SERVICE + "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, lambda r: r.ready
            )
        return Operation(
            SERVICE + "ModelReady", pb.ModelReadyRequest(name=model), pb.ModelReadyResponse, lambda r: r.ready
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
            SERVICE + "ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse, ServerMetadata.from_proto
        )

    @staticmethod
    def _metadata(model: str) -> Operation[ModelMetadata]:
        return Operation(
            SERVICE + "ModelMetadata",
            pb.ModelMetadataRequest(name=model),
            pb.ModelMetadataResponse,
            ModelMetadata.from_proto,
        )

    @staticmethod
    def _statistics(model: str) -> Operation[ModelStatistics]:
        def first(response: pb.ModelStatisticsResponse) -> ModelStatistics:
            return ModelStatistics.from_proto(response.model_stats[0])

        return Operation(
            SERVICE + "ModelStatistics", pb.ModelStatisticsRequest(name=model), pb.ModelStatisticsResponse, first
        )

    @staticmethod
    def _infer(model: str, x: Any, parameters: dict[str, Any]) -> Operation[Any]:
        request, decoder = encode(model, x, parameters)
        return Operation(SERVICE + "ModelInfer", request, pb.ModelInferResponse, decoder.decode)

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
