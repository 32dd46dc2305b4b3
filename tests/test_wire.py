"""ModelInfer's zero-copy wire format reads and writes exactly what protobuf would."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.transport.wire import (
    ZERO_COPY_MIN_BYTES,
    decode_infer_request,
    encode_infer_response,
    split_raw_inputs,
)

names = st.text(max_size=20)
shapes = st.lists(st.integers(min_value=-1, max_value=2**40), max_size=5)
blobs = st.binary(max_size=300) | st.integers(min_value=0, max_value=3).map(
    lambda k: bytes([k]) * (ZERO_COPY_MIN_BYTES + k)
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    for key, value in draw(
        st.dictionaries(names, st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3)
    ).items():
        message.parameters[key].int64_param = value
    for _ in range(draw(st.integers(0, 3))):
        tensor = message.inputs.add(name=draw(names), datatype=draw(names), shape=draw(shapes))
        values = draw(st.lists(st.floats(allow_nan=False, width=32), max_size=4))
        if values:
            tensor.contents.fp32_contents.extend(values)
    for _ in range(draw(st.integers(0, 2))):
        message.outputs.add(name=draw(names))
    for blob in draw(st.lists(blobs, max_size=3)):
        message.raw_input_contents.append(blob)
    return message


@settings(max_examples=150, deadline=None)
@given(infer_requests())
def test_raw_inputs_are_split_out_as_views_of_the_received_bytes(message: pb.ModelInferRequest) -> None:
    data = message.SerializeToString()
    split = split_raw_inputs(data)
    assert split is not None
    rest, raw = split
    parsed = pb.ModelInferRequest.FromString(rest)
    assert list(parsed.raw_input_contents) == []
    assert [bytes(r) for r in raw] == list(message.raw_input_contents)
    assert all(r.obj is data for r in raw)  # views, not copies
    parsed.raw_input_contents.extend(bytes(r) for r in raw)
    assert parsed == message


@settings(max_examples=150, deadline=None)
@given(infer_requests())
def test_decoded_requests_equal_protobufs_parse(message: pb.ModelInferRequest) -> None:
    data = message.SerializeToString()
    wire = decode_infer_request(data)
    assert [bytes(r) for r in wire.raw_input_contents] == list(message.raw_input_contents)
    assert wire.message.model_name == message.model_name
    assert list(wire.message.inputs) == list(message.inputs)
    assert dict(wire.message.parameters) == dict(message.parameters)
    # Large messages take the zero-copy path; small ones are parsed whole.
    assert (wire.raw is not None) == (len(data) >= ZERO_COPY_MIN_BYTES)


def test_fields_in_any_order_and_unknown_fields_survive() -> None:
    blob = bytes(range(256)) * 300
    head = pb.ModelInferRequest(model_name="lrn").SerializeToString()
    raw = pb.ModelInferRequest(raw_input_contents=[blob]).SerializeToString()
    unknown = b"\xa0\x06\x2a"  # field 100, varint 42
    tail = pb.ModelInferRequest(id="req-1").SerializeToString()
    wire = decode_infer_request(raw + head + unknown + tail)
    assert wire.raw is not None and bytes(wire.raw[0]) == blob
    assert (wire.message.model_name, wire.message.id) == ("lrn", "req-1")
    assert wire.message.SerializeToString().find(unknown) >= 0  # kept, as protobuf keeps it


# model_name "lrn" (5 bytes), then raw_input_contents: key, 3-byte length, 64 KiB payload.
TRUNCATIONS = [1, 3, 6, 7, -1, -100]  # inside the name, after a key, inside a length, inside the payload


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_truncated_messages_fail_as_protobuf_fails(cut: int) -> None:
    data = pb.ModelInferRequest(model_name="lrn", raw_input_contents=[b"x" * ZERO_COPY_MIN_BYTES]).SerializeToString()
    broken = data[:cut]
    assert split_raw_inputs(broken) is None
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(broken)
    with pytest.raises(DecodeError):
        decode_infer_request(broken)


def test_a_group_or_field_zero_is_left_to_protobuf() -> None:
    assert split_raw_inputs(b"\x0b\x0c") is None  # field 1, start group
    assert split_raw_inputs(b"\x00\x01") is None  # field 0


@pytest.mark.parametrize("sizes", [[], [0], [5], [127, 128], [16_384, 3, 300_000]])
def test_encoded_responses_parse_to_the_same_message(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    outputs = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    message = pb.ModelInferResponse(model_name="lrn", model_version="1", id="abc")
    for i, out in enumerate(outputs):
        message.outputs.add(name=f"out{i}", datatype="FP32", shape=[1, out.size])
    expected = pb.ModelInferResponse()
    expected.CopyFrom(message)
    expected.raw_output_contents.extend(out.tobytes() for out in outputs)
    views = [memoryview(out) if i % 2 else out.tobytes() for i, out in enumerate(outputs)]
    data = encode_infer_response(message, views)
    assert pb.ModelInferResponse.FromString(data) == expected
    assert len(data) == len(expected.SerializeToString())
