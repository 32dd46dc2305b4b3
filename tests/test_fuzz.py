"""Property-based fuzzing of ModelInfer against a live server.

Hypothesis builds requests with random models, datatypes, shapes (negative, zero, huge),
byte lengths, typed contents, parameter names, types and values, and NaN/Inf tensors. Every
answer must be OK with the right result, or one of the documented statuses; never INTERNAL
or UNKNOWN; and the server must answer a valid request afterwards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from harness import ServerThread, infer_request, lrn_model, output_array, settings, stub, wait_until
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lrnserve.client._tensors import set_parameter
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.ops import local_response_norm
from lrnserve.server.settings import ModelConfig

EXAMPLES = int(os.environ.get("LRNSERVE_FUZZ_EXAMPLES", "2000"))
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
ITEMSIZE = {"FP32": 4, "FP64": 8, "FP16": 2, "BF16": 2}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = replace(
        settings(lrn_model("lrn", max_request_samples=16), ModelConfig(name="cifar10_full", kind="cifar10_full")),
        max_tensor_elements=50_000,
    )
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with server.channel() as ch:
        yield ch


dims = st.one_of(
    st.integers(1, 6), st.integers(1, 6), st.integers(-3, 0), st.sampled_from([2**31, 2**40, 2**62, 3 * 10**6])
)
good_shapes = st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(1, 6), st.integers(1, 6)).map(list)
shapes = st.one_of(good_shapes, good_shapes, st.lists(dims, max_size=6), st.just([1, 3, 32, 32]))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
parameter_values = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 3),
    st.sampled_from(["across", "within", "", "ACROSS", "spatial"]),
    st.text(max_size=8),
)
parameters = st.dictionaries(
    st.sampled_from(["mode", "size", "alpha", "beta", "k", "timeout", "priority", "bogus", ""]),
    parameter_values,
    max_size=5,
)


valid_parameters = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(["across", "within"]),
        "size": st.integers(1, 12),
        "alpha": st.floats(0, 3),
        "beta": st.floats(-1, 3),
        "k": st.floats(0.01, 5),
        "timeout": st.just(30_000_000),
    },
)
MUTATIONS = ["none"] * 6 + ["model", "version", "datatype", "shape", "bytes", "params", "outputs", "name", "chaos"]


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with at most one thing broken, or (chaos) everything random."""
    mutation = draw(st.sampled_from(MUTATIONS))
    model = draw(st.sampled_from(["lrn", "lrn", "cifar10_full"]))
    shape = draw(good_shapes) if model == "lrn" else [draw(st.integers(1, 2)), 3, 32, 32]
    datatype = draw(st.sampled_from(["FP32", "FP16", "BF16", "FP64"]))
    spec: dict[str, Any] = {
        "model": model,
        "version": draw(st.sampled_from(["", "1"])),
        "name": "input",
        "datatype": datatype,
        "shape": shape,
        "special": draw(st.sampled_from(["raw", "raw", "contents"])) if datatype == "FP32" else "raw",
        "parameters": draw(valid_parameters) if model == "lrn" else {},
        "outputs": draw(st.sampled_from([[], ["output" if model == "lrn" else "probabilities"]])),
    }
    if mutation in ("model", "chaos"):
        spec["model"] = draw(st.sampled_from(["vgg", "", "LRN", "lrn ", "cifar10_full", "lrn"]))
    if mutation in ("version", "chaos"):
        spec["version"] = draw(st.sampled_from(["2", "0", "latest", "1"]))
    if mutation in ("datatype", "chaos"):
        spec["datatype"] = datatype = draw(st.sampled_from(["INT8", "BYTES", "", "fp32", "FP32", "BF16"]))
    if mutation in ("shape", "chaos"):
        spec["shape"] = shape = draw(shapes)
    if mutation in ("bytes", "chaos"):
        spec["special"] = draw(st.sampled_from(["short", "long", "none", "two_raw", "contents"]))
    if mutation in ("params", "chaos"):
        spec["parameters"] = draw(parameters)
    if mutation in ("outputs", "chaos"):
        spec["outputs"] = draw(st.sampled_from([["nope"], ["output", "output"], ["probabilities"]]))
    if mutation in ("name", "chaos"):
        spec["name"] = draw(st.sampled_from(["x", "", "INPUT"]))
    count = math.prod(shape) if shape and all(0 < d < 10**5 for d in shape) else None
    values = None
    if count is not None and count <= 20_000:
        values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(count) * 100
        fill = draw(st.one_of(st.just("random"), floats))
        if fill != "random":
            values[draw(st.integers(0, count - 1))] = fill
        if datatype == "FP16":
            values = np.clip(values, -6e4, 6e4)  # in range, so only the drawn specials are non-finite
    spec["values"] = values
    return spec


def build(spec: dict[str, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=spec["model"], model_version=spec["version"])
    tensor = request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
    values = spec["values"]
    itemsize = ITEMSIZE.get(spec["datatype"], 4)
    raw = b""
    if values is not None:
        if spec["datatype"] == "BF16":
            raw = torch.from_numpy(values.astype(np.float32)).bfloat16().view(torch.int16).numpy().tobytes()
        else:
            raw = values.astype(NUMPY.get(spec["datatype"], np.float32)).tobytes()
    else:
        raw = b"\0" * (itemsize * 3)
    special = spec["special"]
    if special == "short":
        request.raw_input_contents.append(raw[:-1])
    elif special == "long":
        request.raw_input_contents.append(raw + b"\0")
    elif special == "contents" and values is not None:
        tensor.contents.fp32_contents.extend(values.astype(np.float32).tolist())
    elif special == "two_raw":
        request.raw_input_contents.extend([raw, raw])
    elif special != "none":
        request.raw_input_contents.append(raw)
    for key, value in spec["parameters"].items():
        set_parameter(request.parameters[key], key, value)
    for name in spec["outputs"]:
        request.outputs.add(name=name)
    return request


def expected_lrn(request: pb.ModelInferRequest) -> np.ndarray:
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in request.parameters.items()}
    tensor = request.inputs[0]
    shape = tuple(tensor.shape)
    if tensor.datatype == "BF16":
        raw = request.raw_input_contents[0]
        x = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    elif request.raw_input_contents:
        x = torch.from_numpy(np.frombuffer(request.raw_input_contents[0], NUMPY[tensor.datatype]).reshape(shape).copy())
    else:
        x = torch.tensor(list(tensor.contents.fp32_contents), dtype=torch.float32).reshape(shape)
    y = local_response_norm(
        x,
        params.get("size", 5),
        params.get("alpha", 1e-4),
        params.get("beta", 0.75),
        params.get("k", 1.0),
        params.get("mode", "across"),
    )
    return y.float().numpy()


@hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(spec=requests())
def test_fuzzed_requests_get_a_correct_answer_or_a_documented_status(
    channel: grpc.Channel, spec: dict[str, Any]
) -> None:
    request = build(spec)
    try:
        response = stub(channel).ModelInfer(request, timeout=30)
    except grpc.RpcError as exc:
        event(exc.code().name)
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details(), spec)
        assert exc.details(), "every refusal says why"
        return
    event("OK")
    out = response.outputs[0]
    assert out.datatype == request.inputs[0].datatype
    if request.model_name == "lrn":
        got = output_array(response).astype(np.float32)
        np.testing.assert_allclose(got, expected_lrn(request), rtol=1e-6, atol=0, equal_nan=True)
    else:
        assert list(out.shape) == [request.inputs[0].shape[0], 10]


def test_server_still_answers_after_fuzzing(server: ServerThread, channel: grpc.Channel) -> None:
    x = np.ones((1, 4, 3, 3), np.float32)
    y = output_array(stub(channel).ModelInfer(infer_request("lrn", x), timeout=30))
    np.testing.assert_array_equal(y, local_response_norm(torch.from_numpy(x), 5).numpy())
    # Given back when each call's task ends, just after its answer went out.
    wait_until(lambda: server.server.dataplane.inflight_bytes == 0, "the byte budget given back")
