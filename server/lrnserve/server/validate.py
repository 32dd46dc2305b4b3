"""Every check of an inference request, as one pure function.

``validate`` judges a request against the model it was routed to and the server's limits
before anything is queued or allocated, and returns what the rest of the path needs: the
batcher's work item, the deadline, the bytes to admit and the resolved parameters. It reads
no server state and changes nothing (not even the request), so it is tested without a server.
Every failure is a ``ServingError`` whose message names the field (``inputs[0].shape``,
``parameters.alpha``) and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lrnserve.client.datatypes import DataType, from_wire, wire_names

from .errors import InvalidArgument, ResourceExhausted
from .inference import InferenceRequest, InputTensor, ParameterValue
from .servables import Resolved, Servable
from .shared_memory import PARAMETERS as SHARED_MEMORY_PARAMETERS
from .shared_memory import REGION as SHARED_MEMORY_REGION
from .work import Work

IMPOSSIBLE_ELEMENTS = 2**63
RESERVED_PARAMETERS = ("timeout", "priority")  # the protocol's own; never the model's
CLASSIFICATION = "classification"  # a requested output's parameter: answer its top k classes


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; checked before anything is allocated or queued."""

    max_tensor_bytes: int
    max_tensor_elements: int
    max_request_samples: int  # the model's: samples (N) one request may carry


@dataclass(frozen=True)
class Validated:
    """A request that passed every check, resolved for the batcher and the answer."""

    work: Work
    deadline: float | None  # time.monotonic() by which compute must start
    nbytes: int  # the input tensor's size, for admission
    parameters: Resolved
    datatype: DataType  # the answer's (``Servable.output_datatype`` of the input's)
    output_shape: tuple[int, ...]
    classification: int | None = None  # top-k asked of the output (the classification extension)

    @property
    def output_bytes(self) -> int:
        return math.prod(self.output_shape) * self.datatype.itemsize


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def bytes_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def validate(request: InferenceRequest, servable: Servable, limits: Limits, arrival: float) -> Validated:
    """``request`` judged for ``servable``; ``arrival`` (time.monotonic()) anchors its deadlines."""
    parameters = _valued_parameters(request.parameters)
    tensor, datatype, nbytes = _check_input(request, servable, limits)
    if tensor.shape[0] > limits.max_request_samples:
        raise ResourceExhausted(
            f"inputs[0].shape: {tensor.shape[0]} samples, over model '{servable.name}''s limit of "
            f"{limits.max_request_samples} per request; split the request"
        )
    classification = _check_outputs(request, servable)
    deadline = _deadline(parameters, request.time_remaining, arrival)
    _check_priority(parameters)
    model_parameters = {k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS}
    resolved = servable.resolve(model_parameters)
    too_costly = servable.check_cost(tensor.shape, resolved)
    if too_costly:
        raise ResourceExhausted(too_costly)
    work = Work(
        payload=_payload(tensor, datatype),
        shape=tensor.shape,
        dtype=getattr(torch, datatype.torch),
        model_group=resolved.group,
        scalars=resolved.scalars,
    )
    answer = servable.output_datatype(datatype)  # a UINT8 image's answer is the model's float type
    return Validated(work, deadline, nbytes, resolved, answer, servable.output_shape(tensor.shape), classification)


def _valued_parameters(parameters: Mapping[str, ParameterValue | None]) -> dict[str, ParameterValue]:
    valued: dict[str, ParameterValue] = {}
    for name, value in parameters.items():
        if value is None:
            raise InvalidArgument(f"parameters.{name}: parameter has no value")
        valued[name] = value
    return valued


def _check_input(request: InferenceRequest, servable: Servable, limits: Limits) -> tuple[InputTensor, DataType, int]:
    for i, candidate in enumerate(request.inputs):
        if len(candidate.contents_fields) > 1:
            raise InvalidArgument(
                f"inputs[{i}].contents: values in {' and '.join(candidate.contents_fields)}; use one field"
            )
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
            f"inputs[0].name: unknown input '{tensor.name}'; model '{servable.name}' has input '{servable.input_name}'"
        )
    datatype = from_wire(tensor.datatype)
    if datatype is None:
        raise InvalidArgument(f"inputs[0].datatype: unsupported '{tensor.datatype}'; expected one of {wire_names()}")
    accepted = servable.input_datatypes()
    if datatype.wire not in accepted:
        raise InvalidArgument(
            f"inputs[0].datatype: model '{servable.name}' takes {', '.join(accepted)}, got {datatype.wire}"
        )
    shape = tensor.shape
    if len(shape) != 4:
        dims = ", ".join(servable.layout)  # [N, C, H, W], or [N, H, W, C] for an NHWC model
        raise InvalidArgument(f"inputs[0].shape: expected 4 dimensions [{dims}], got {shape_text(shape)}")
    if any(d < 1 for d in shape):
        raise InvalidArgument(f"inputs[0].shape: every dimension must be >= 1, got {shape_text(shape)}")
    elements = math.prod(shape)
    if elements >= IMPOSSIBLE_ELEMENTS:
        raise InvalidArgument(f"inputs[0].shape: {shape_text(shape)} has more than 2^63 elements")
    if elements > limits.max_tensor_elements:
        raise ResourceExhausted(
            f"inputs[0]: {shape_text(shape)} has {elements} elements, over the limit of "
            f"{limits.max_tensor_elements} per tensor"
        )
    nbytes = elements * datatype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise ResourceExhausted(
            f"inputs[0]: {shape_text(shape)} {datatype.wire} is {bytes_text(nbytes)}, over the "
            f"{bytes_text(limits.max_tensor_bytes)} limit per tensor"
        )
    problem = servable.check_sample_shape(tuple(shape[1:]))
    if problem:
        raise InvalidArgument(f"inputs[0].shape: {problem}, got {shape_text(shape)}")
    _check_data(tensor, datatype, nbytes)
    return tensor, datatype, nbytes


def _check_data(tensor: InputTensor, datatype: DataType, nbytes: int) -> None:
    field = tensor.contents_fields[0] if tensor.contents_fields else None
    if tensor.raw is not None:
        if field is not None:
            raise InvalidArgument(f"inputs[0].contents: give either raw_input_contents or contents.{field}, not both")
        if len(tensor.raw) != nbytes:
            raise InvalidArgument(
                f"raw_input_contents[0]: {len(tensor.raw)} bytes, but {shape_text(tensor.shape)} "
                f"{datatype.wire} needs {nbytes} bytes"
            )
        return
    if field is None:
        expected = f" or contents.{datatype.contents_field}" if datatype.contents_field else ""
        raise InvalidArgument(f"inputs[0]: no tensor data; send raw_input_contents{expected}")
    if field != datatype.contents_field:
        if datatype.contents_field is None:
            raise InvalidArgument(f"inputs[0].contents: {datatype.wire} tensors must be sent in raw_input_contents")
        raise InvalidArgument(
            f"inputs[0].contents.{field}: a {datatype.wire} tensor takes contents.{datatype.contents_field}"
        )
    assert tensor.contents is not None  # one numeric field carried values
    count = math.prod(tensor.shape)
    if tensor.contents.size != count:
        raise InvalidArgument(
            f"inputs[0].contents.{field}: {tensor.contents.size} values, but shape "
            f"{shape_text(tensor.shape)} has {count}"
        )


def _payload(tensor: InputTensor, datatype: DataType) -> np.ndarray:
    if tensor.raw is not None:
        return np.frombuffer(tensor.raw, dtype=np.uint8)
    assert tensor.contents is not None  # _check_data guarantees one of the two
    return np.ascontiguousarray(tensor.contents, dtype=datatype.numpy_storage).view(np.uint8).reshape(-1)


def _check_outputs(request: InferenceRequest, servable: Servable) -> int | None:
    """Each requested output is the model's; returns the class count asked by one, if any."""
    classification = None
    for i, name in enumerate(request.requested_outputs):
        if name != servable.output_name:
            raise InvalidArgument(
                f"outputs[{i}].name: unknown output '{name}'; model '{servable.name}' has output "
                f"'{servable.output_name}'"
            )
        parameters = request.output_parameters[i] if i < len(request.output_parameters) else {}
        for key, value in parameters.items():
            if key == CLASSIFICATION:
                classification = _class_count(value, servable, f"outputs[{i}].parameters.{key}")
            elif key not in SHARED_MEMORY_PARAMETERS:
                accepted = ", ".join((CLASSIFICATION, *SHARED_MEMORY_PARAMETERS))
                raise InvalidArgument(f"outputs[{i}].parameters.{key}: unknown parameter; accepted: {accepted}")
        if classification is not None and SHARED_MEMORY_REGION in parameters:
            raise InvalidArgument(
                f"outputs[{i}].parameters.{SHARED_MEMORY_REGION}: a classification answer (BYTES) is sent in the "
                "message, not to shared memory"
            )
    return classification


def _class_count(value: ParameterValue | None, servable: Servable, key: str) -> int:
    """The classification extension's k: an int64 from 1 to the output's classes."""
    if value is None:
        raise InvalidArgument(f"{key}: parameter has no value")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{key}: expected the class count as an int64, got {value!r}")
    classes = servable.classes
    if classes is None:
        raise InvalidArgument(
            f"{key}: output '{servable.output_name}' of model '{servable.name}' is not [N, classes]; "
            "it cannot be classified"
        )
    if not 1 <= value <= classes:
        raise InvalidArgument(
            f"{key}: expected a class count from 1 to {classes} (the classes of output "
            f"'{servable.output_name}'), got {value}"
        )
    return value


def _deadline(parameters: Mapping[str, ParameterValue], time_remaining: float | None, arrival: float) -> float | None:
    """Earliest of the gRPC deadline and the protocol's ``timeout`` parameter (microseconds)."""
    deadline = arrival + time_remaining if time_remaining is not None else None
    if "timeout" in parameters:
        timeout = parameters["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidArgument(f"parameters.timeout: expected microseconds as an int64 >= 0, got {timeout!r}")
        if timeout > 0:  # 0 means no timeout, as in the protocol
            limit = arrival + timeout / 1e6
            deadline = limit if deadline is None else min(deadline, limit)
    return deadline


def _check_priority(parameters: Mapping[str, ParameterValue]) -> None:
    """Accepted for the protocol's sake (all requests are served in arrival order)."""
    if "priority" in parameters:
        priority = parameters["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise InvalidArgument(f"parameters.priority: expected a uint64, got {priority!r}")
