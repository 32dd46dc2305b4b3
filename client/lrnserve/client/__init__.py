"""lrnserve's Python client: grpcio, protobuf and numpy only (torch only if you pass tensors).

from lrnserve.client import Client
with Client("localhost:8001", timeout=10) as client:
    y = client.lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0)
"""

from ._async_client import AsyncClient
from ._client import Client
from ._config import TLS, Retry
from ._errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LrnserveError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from ._stream import StreamResult
from ._types import Classification, ModelMetadata, ModelStatistics, ServerMetadata, TensorMetadata
from .version import __version__

__all__ = [
    "TLS",
    "AsyncClient",
    "Cancelled",
    "Classification",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LrnserveError",
    "ModelMetadata",
    "ModelStatistics",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Retry",
    "ServerMetadata",
    "StreamResult",
    "TensorMetadata",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
]
