"""ModelInfer's wire format without copying tensor bytes more than once each way.

protobuf copies a ``bytes`` field when it parses it, again when Python reads it,
and again (twice) when a message that holds one is serialized. For megabyte
tensors those copies were a fifth of the event loop thread's time. So for
ModelInfer the server:

- reads ``raw_input_contents`` as views into the received message (large
  messages only; small ones are parsed whole, which is cheaper for them), and
  lets protobuf parse the rest;
- writes the response as the serialized message without its raw outputs,
  followed by each raw output as a ``raw_output_contents`` field. Protobuf
  parsers accept fields in any order and concatenated fields, so clients read
  exactly the message they would have read otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc

from ..admission import Budget, Lease
from .calls import CallTracker, current_call
from .receiving import ReceiveSlots

RAW_INPUT_FIELD = pb.ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER
RAW_OUTPUT_FIELD = pb.ModelInferResponse.RAW_OUTPUT_CONTENTS_FIELD_NUMBER
LENGTH_DELIMITED = 2
# Below this, a whole-message parse (in C) beats walking the fields in Python.
ZERO_COPY_MIN_BYTES = 64 * 1024

Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class InferRequestWire:
    """A received ModelInfer request; ``raw`` holds its raw_input_contents when they were
    taken out of ``message`` as views of the received bytes (None: they are in ``message``).
    A message of a stream has its own ``lease`` and the time it was ``received`` (a unary
    call's are its call's)."""

    message: pb.ModelInferRequest
    raw: list[memoryview] | None = None
    lease: Lease | None = None
    received: float | None = None

    @property
    def raw_input_contents(self) -> Sequence[Buffer]:
        return self.message.raw_input_contents if self.raw is None else self.raw


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        byte = data[pos]  # IndexError when truncated
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def split_raw_inputs(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """The message without its raw_input_contents fields, and those fields' values as views of
    ``data``; None when ``data`` is not well-formed at the top level (protobuf then says why)."""
    view = memoryview(data)
    end = len(data)
    kept: list[memoryview] = []
    raw: list[memoryview] = []
    pos = kept_from = 0
    try:
        while pos < end:
            field_start = pos
            key, pos = _varint(data, pos)
            field, wire_type = key >> 3, key & 7
            if field == 0:
                return None
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == LENGTH_DELIMITED:
                length, pos = _varint(data, pos)
                if field == RAW_INPUT_FIELD and pos + length <= end:
                    kept.append(view[kept_from:field_start])
                    raw.append(view[pos : pos + length])
                    kept_from = pos + length
                pos += length
            else:  # groups: not in proto3 messages
                return None
            if pos > end:
                return None
    except (IndexError, ValueError):
        return None
    kept.append(view[kept_from:end])
    return b"".join(kept), raw


def decode_infer_request(data: bytes) -> InferRequestWire:
    """The received message, charged to its call's lease; one the budget cannot hold keeps
    only what the refusal needs (model name, id), so its bytes are freed at once."""
    call = current_call()
    if call is not None and not call.lease.charge(len(data)):
        return InferRequestWire(_without_tensors(data))  # the lease says it was refused
    return _decode(data)


def decode_stream_request(data: bytes) -> InferRequestWire:
    """A message of a ModelStreamInfer stream, charged to a lease of its own (``decode_infer_request``
    otherwise): each request of a stream is held only until its own answer is handed to gRPC."""
    received = time.monotonic()
    call = current_call()
    lease = None if call is None else call.lease.sibling()
    if lease is not None and not lease.charge(len(data)):
        return InferRequestWire(_without_tensors(data), lease=lease, received=received)
    decoded = _decode(data)
    return InferRequestWire(decoded.message, decoded.raw, lease, received)


def _without_tensors(data: bytes) -> pb.ModelInferRequest:
    split = split_raw_inputs(data) if len(data) >= ZERO_COPY_MIN_BYTES else None
    message = pb.ModelInferRequest.FromString(data if split is None else split[0])
    message.ClearField("raw_input_contents")
    for tensor in message.inputs:
        tensor.ClearField("contents")
    return message


def _decode(data: bytes) -> InferRequestWire:
    if len(data) >= ZERO_COPY_MIN_BYTES:
        split = split_raw_inputs(data)
        if split is not None:
            rest, raw = split
            return InferRequestWire(pb.ModelInferRequest.FromString(rest), raw)
    return InferRequestWire(pb.ModelInferRequest.FromString(data))


def length_delimited_key(field: int, length: int) -> bytes:
    out = bytearray()
    for value in ((field << 3) | LENGTH_DELIMITED, length):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def encode_infer_response(message: pb.ModelInferResponse, raw_outputs: Sequence[Buffer]) -> bytes:
    """``message`` (without raw outputs) serialized, with ``raw_outputs`` as its raw_output_contents."""
    parts: list[Buffer] = [message.SerializeToString()]
    for raw in raw_outputs:
        parts.append(length_delimited_key(RAW_OUTPUT_FIELD, memoryview(raw).nbytes))
        parts.append(raw)
    return b"".join(parts)


Handlers = dict[str, "grpc.RpcMethodHandler[Any, Any]"]


class _Recorder:
    """Stands in for a server to catch the handlers the generated code registers."""

    def __init__(self) -> None:
        self.handlers: Handlers = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = dict(handlers)


def add_inference_service(
    server: grpc.aio.Server,
    servicer: Any,
    budget: Budget,
    slots: ReceiveSlots,
    on_calls: Callable[[int], None] | None = None,
) -> CallTracker:
    """The generated registration, except that ModelInfer and ModelStreamInfer take
    ``InferRequestWire`` and return serialized responses as ``bytes``, that its message is received only once one
    of ``slots`` is free (``receiving``), and that every call is tracked from its start
    (returned: the tracker; ``on_calls`` hears how many are in progress). The handlers are
    registered as generic ones only: gRPC's registered-method path skips the lookup the
    tracker hooks into."""
    recorder = _Recorder()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, recorder)  # type: ignore[arg-type]
    handlers = recorder.handlers
    handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
        slots.reading(servicer.ModelInfer), request_deserializer=decode_infer_request, response_serializer=None
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=decode_stream_request, response_serializer=None
    )
    name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    tracker = CallTracker(grpc.method_handlers_generic_handler(name, handlers), budget, on_calls)
    server.add_generic_rpc_handlers((tracker,))
    return tracker
