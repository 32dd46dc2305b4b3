"""Transport-neutral request and response objects.

Metadata types are the client's own (``lrnserve.client``): they describe the same protocol
objects on both sides.

The gRPC layer turns protobuf messages into these (and back) without judging
them; the dataplane validates them. Tensor payloads stay as the bytes that came
off the wire until the batcher copies them into a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from lrnserve.client import ModelMetadata, ServerMetadata, TensorMetadata

from .admission import Lease

ParameterValue = bool | int | float | str


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None  # raw_input_contents entry (a view of the message), if any
    contents: np.ndarray | None = None  # typed contents, already as an array (when one field had values)
    contents_fields: tuple[str, ...] = ()  # the typed fields that carried values
    parameters: Mapping[str, ParameterValue | None] = field(default_factory=dict)  # e.g. shared memory


@dataclass(frozen=True)
class InferenceRequest:
    model: str
    version: str
    id: str
    inputs: tuple[InputTensor, ...]
    parameters: Mapping[str, ParameterValue | None] = field(default_factory=dict)  # None: sent without a value
    requested_outputs: tuple[str, ...] = ()
    # Each requested output's parameters, in the same order (e.g. "classification"); None: no value.
    output_parameters: tuple[Mapping[str, ParameterValue | None], ...] = ()
    # Seconds left before the caller's gRPC deadline, when it set one.
    time_remaining: float | None = None
    # How many raw_input_contents entries the message carried (must match the inputs).
    raw_count: int = 0
    # When the call began (time.monotonic()), before its message arrived; None if unknown.
    started: float | None = None
    # The call's share of the in-flight byte budget, charged for the message on receipt (and
    # possibly refused then); None when the request did not come through the transport.
    lease: Lease | None = None
    # Whether the caller is on this host (loopback or a unix socket): only such callers may name
    # shared memory. Asked only of requests that name it (the peer's address costs a lookup per
    # call); in-process callers are local.
    local: Callable[[], bool] = field(default=lambda: True)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None  # None: written to shared memory, named by ``parameters``
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceResponse:
    model: str
    version: str
    id: str
    outputs: tuple[OutputTensor, ...]


__all__ = [
    "InferenceRequest",
    "InferenceResponse",
    "InputTensor",
    "ModelMetadata",
    "OutputTensor",
    "ParameterValue",
    "ServerMetadata",
    "TensorMetadata",
]
