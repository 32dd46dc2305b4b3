"""The transport-neutral data plane: validate, route to a model's batcher, answer.

Every check happens here, before anything is queued or allocated, and fails
with a ``ServingError`` whose message names the field (``inputs[0].shape``,
``parameters.alpha``) and what was expected.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from lrnserve.client._version import __version__
from lrnserve.client.datatypes import DataType, from_wire, wire_names

from .errors import InvalidArgument, ResourceExhausted, Unavailable
from .executor import Work
from .inference import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    ModelMetadata,
    OutputTensor,
    ParameterValue,
    ServerMetadata,
)
from .repository import ModelRepository, ServedModel
from .servables import Servable
from .settings import ServerSettings
from .statistics import ModelStatistics, StatisticsStore

SERVER_NAME = "lrnserve"
IMPOSSIBLE_ELEMENTS = 2**63


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; checked before anything is allocated or queued."""

    max_tensor_bytes: int
    max_tensor_elements: int
    max_inflight_bytes: int  # input bytes of all requests being handled at once

    @classmethod
    def of(cls, settings: ServerSettings) -> Limits:
        return cls(settings.max_tensor_bytes, settings.max_tensor_elements, settings.max_inflight_bytes)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        statistics: StatisticsStore,
        limits: Limits,
        extensions: tuple[str, ...] = ("parameters", "statistics"),
    ) -> None:
        self.repository = repository
        self.statistics_store = statistics
        self.limits = limits
        self.extensions = extensions
        self.draining = False
        self.inflight_bytes = 0

    # ---- health and metadata ----

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.all_ready

    def model_ready(self, name: str, version: str) -> bool:
        return not self.draining and self.repository.get(name, version).ready

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, __version__, self.extensions)

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return self._servable(self.repository.get(name, version)).metadata()

    def statistics(self, name: str, version: str) -> list[tuple[str, ModelStatistics]]:
        """One model's statistics, or every model's when ``name`` is empty."""
        names = [self.repository.get(name, version).name] if name else self.repository.names()
        return [(n, self.statistics_store.get(n)) for n in names]

    @staticmethod
    def _servable(model: ServedModel) -> Servable:
        if model.servable is None:
            raise Unavailable(f"model '{model.name}' is still loading; retry shortly")
        return model.servable

    # ---- inference ----

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        arrival = time.monotonic()
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        model = self.repository.get(request.model, request.version)
        if not model.ready or model.batcher is None:
            raise Unavailable(f"model '{model.name}' is not ready; retry shortly")
        servable = self._servable(model)
        tensor, datatype, nbytes = self._check_input(request, servable)
        if tensor.shape[0] > model.config.batching.max_request_samples:
            raise ResourceExhausted(
                f"inputs[0].shape: {tensor.shape[0]} samples, over model '{model.name}''s limit of "
                f"{model.config.batching.max_request_samples} per request; split the request"
            )
        self._check_outputs(request, servable)
        parameters = dict(request.parameters)
        deadline = self._deadline(parameters, request.time_remaining, arrival)
        resolved = servable.resolve(parameters)
        too_costly = servable.check_cost(tensor.shape, resolved)
        if too_costly:
            raise ResourceExhausted(too_costly)
        if self.inflight_bytes + nbytes > self.limits.max_inflight_bytes:
            raise ResourceExhausted(
                f"server busy: {_bytes_text(self.inflight_bytes)} of requests in flight, limit "
                f"{_bytes_text(self.limits.max_inflight_bytes)}; retry later"
            )
        work = Work(
            payload=self._payload(tensor, datatype),
            shape=tensor.shape,
            dtype=getattr(torch, datatype.torch),
            model_group=resolved.group,
            scalars=resolved.scalars,
        )
        self.inflight_bytes += nbytes
        try:
            raw = await model.batcher.submit(work, deadline)
        finally:
            self.inflight_bytes -= nbytes
        out_shape = servable.output_shape(tensor.shape)
        return InferenceResponse(
            model=model.name,
            version="1",
            id=request.id,
            outputs=(OutputTensor(servable.output_name, datatype.wire, out_shape, raw),),
        )

    def _check_input(self, request: InferenceRequest, servable: Servable) -> tuple[InputTensor, DataType, int]:
        if len(request.inputs) != 1:
            raise InvalidArgument(
                f"inputs: model '{servable.name}' takes exactly 1 input ('{servable.input_name}'), "
                f"got {len(request.inputs)}"
            )
        if request.raw_count not in (0, len(request.inputs)):
            raise InvalidArgument(
                f"raw_input_contents: {request.raw_count} entries for {len(request.inputs)} input; "
                "send one entry per input, or none"
            )
        tensor = request.inputs[0]
        if tensor.name != servable.input_name:
            raise InvalidArgument(
                f"inputs[0].name: unknown input '{tensor.name}'; model '{servable.name}' has input "
                f"'{servable.input_name}'"
            )
        datatype = from_wire(tensor.datatype)
        if datatype is None:
            raise InvalidArgument(
                f"inputs[0].datatype: unsupported '{tensor.datatype}'; expected one of {wire_names()}"
            )
        shape = tensor.shape
        if len(shape) != 4:
            raise InvalidArgument(f"inputs[0].shape: expected 4 dimensions [N, C, H, W], got {_shape_text(shape)}")
        if any(d < 1 for d in shape):
            raise InvalidArgument(f"inputs[0].shape: every dimension must be >= 1, got {_shape_text(shape)}")
        elements = math.prod(shape)
        if elements >= IMPOSSIBLE_ELEMENTS:
            raise InvalidArgument(f"inputs[0].shape: {_shape_text(shape)} has more than 2^63 elements")
        if elements > self.limits.max_tensor_elements:
            raise ResourceExhausted(
                f"inputs[0]: {_shape_text(shape)} has {elements} elements, over the limit of "
                f"{self.limits.max_tensor_elements} per tensor"
            )
        nbytes = elements * datatype.itemsize
        if nbytes > self.limits.max_tensor_bytes:
            raise ResourceExhausted(
                f"inputs[0]: {_shape_text(shape)} {datatype.wire} is {_bytes_text(nbytes)}, over the "
                f"{_bytes_text(self.limits.max_tensor_bytes)} limit per tensor"
            )
        problem = servable.check_sample_shape(tuple(shape[1:]))
        if problem:
            raise InvalidArgument(f"inputs[0].shape: {problem}, got {_shape_text(shape)}")
        self._check_data(tensor, datatype, nbytes)
        return tensor, datatype, nbytes

    @staticmethod
    def _check_data(tensor: InputTensor, datatype: DataType, nbytes: int) -> None:
        if tensor.raw is not None:
            if tensor.contents_field is not None:
                raise InvalidArgument(
                    f"inputs[0].contents: give either raw_input_contents or contents.{tensor.contents_field}, not both"
                )
            if len(tensor.raw) != nbytes:
                raise InvalidArgument(
                    f"raw_input_contents[0]: {len(tensor.raw)} bytes, but {_shape_text(tensor.shape)} "
                    f"{datatype.wire} needs {nbytes} bytes"
                )
            return
        if tensor.contents is None or tensor.contents_field is None:
            field = f" or contents.{datatype.contents_field}" if datatype.contents_field else ""
            raise InvalidArgument(f"inputs[0]: no tensor data; send raw_input_contents{field}")
        if tensor.contents_field != datatype.contents_field:
            if datatype.contents_field is None:
                raise InvalidArgument(f"inputs[0].contents: {datatype.wire} tensors must be sent in raw_input_contents")
            raise InvalidArgument(
                f"inputs[0].contents.{tensor.contents_field}: a {datatype.wire} tensor takes "
                f"contents.{datatype.contents_field}"
            )
        count = math.prod(tensor.shape)
        if tensor.contents.size != count:
            raise InvalidArgument(
                f"inputs[0].contents.{tensor.contents_field}: {tensor.contents.size} values, but shape "
                f"{_shape_text(tensor.shape)} has {count}"
            )

    @staticmethod
    def _payload(tensor: InputTensor, datatype: DataType) -> np.ndarray:
        if tensor.raw is not None:
            return np.frombuffer(tensor.raw, dtype=np.uint8)
        assert tensor.contents is not None  # _check_data guarantees one of the two
        return np.ascontiguousarray(tensor.contents, dtype=datatype.numpy_storage).view(np.uint8).reshape(-1)

    @staticmethod
    def _check_outputs(request: InferenceRequest, servable: Servable) -> None:
        for i, name in enumerate(request.requested_outputs):
            if name != servable.output_name:
                raise InvalidArgument(
                    f"outputs[{i}].name: unknown output '{name}'; model '{servable.name}' has output "
                    f"'{servable.output_name}'"
                )

    @staticmethod
    def _deadline(parameters: dict[str, ParameterValue], time_remaining: float | None, arrival: float) -> float | None:
        """Earliest of the gRPC deadline and the protocol's ``timeout`` parameter (microseconds)."""
        deadline = arrival + time_remaining if time_remaining is not None else None
        if "timeout" in parameters:
            timeout = parameters.pop("timeout")
            if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
                raise InvalidArgument(f"parameters.timeout: expected microseconds as an int64 >= 0, got {timeout!r}")
            if timeout > 0:  # 0 means no timeout, as in the protocol
                limit = arrival + timeout / 1e6
                deadline = limit if deadline is None else min(deadline, limit)
        if "priority" in parameters:
            priority = parameters.pop("priority")
            if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
                raise InvalidArgument(f"parameters.priority: expected a uint64, got {priority!r}")
        return deadline
