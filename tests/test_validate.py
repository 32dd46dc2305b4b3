"""``validate``, the pure judgement of an inference request, without a server.

Requests are built as the transport would build them (``InferenceRequest``/``InputTensor``);
the servables are never loaded: validation needs only what they are, not their kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from lrnserve.server.errors import InvalidArgument, ResourceExhausted, ServingError
from lrnserve.server.inference import InferenceRequest, InputTensor, ParameterValue
from lrnserve.server.servables import LRNServable, NetworkServable, Servable, create_servable
from lrnserve.server.settings import ModelConfig
from lrnserve.server.validate import Limits, Validated, validate

CODE = grpc.StatusCode
LRN = LRNServable(ModelConfig(name="lrn", kind="lrn"))
LIMITS = Limits(max_tensor_bytes=2**30, max_tensor_elements=2**28, max_request_samples=1024)
ARRIVAL = 1000.0  # a time.monotonic() value: validate only does arithmetic with it
SHAPE = (2, 4, 3, 3)


@pytest.fixture(scope="module")
def network() -> NetworkServable:
    servable = create_servable(ModelConfig(name="cifar10_full", kind="cifar10_full"))
    assert isinstance(servable, NetworkServable)
    return servable


def raw_tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> InputTensor:
    return InputTensor(name=name, datatype=datatype, shape=x.shape, raw=x.tobytes())


def request(
    tensor: InputTensor | None = None,
    parameters: Mapping[str, ParameterValue | None] | None = None,
    **fields: Any,
) -> InferenceRequest:
    """A request for the LRN model; a raw FP32 tensor of ``SHAPE`` unless told otherwise."""
    if tensor is None:
        tensor = raw_tensor(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE))
    return InferenceRequest(
        model="lrn",
        version="",
        id="r1",
        inputs=(tensor,),
        parameters=parameters if parameters is not None else {},
        raw_count=1 if tensor.raw is not None else 0,
        **fields,
    )


def refused(
    error: type[ServingError],
    field: str,
    req: InferenceRequest,
    servable: Servable = LRN,
    limits: Limits = LIMITS,
) -> ServingError:
    """Assert that ``validate`` refuses ``req`` with ``error`` (and its status), naming ``field`` first."""
    with pytest.raises(error) as info:
        validate(req, servable, limits, ARRIVAL)
    exc = info.value
    assert exc.code == error.code
    assert exc.message.startswith(field), f"{exc.message!r} does not name {field}"
    return exc


def ok(req: InferenceRequest, servable: Servable = LRN, limits: Limits = LIMITS) -> Validated:
    return validate(req, servable, limits, ARRIVAL)


# ---- what a valid request resolves to ----


def test_validate_needs_no_loaded_servable(network: NetworkServable) -> None:
    lrn = LRNServable(ModelConfig(name="lrn", kind="lrn"))
    assert ok(request(), lrn).output_shape == SHAPE
    assert ok(request(raw_tensor(np.zeros((1, 3, 32, 32), np.float32))), network).output_shape == (1, 10)
    for servable in (lrn, network):
        assert not hasattr(servable, "device")  # what load() sets
    assert lrn._kernel is None


def test_a_valid_lrn_request_resolves_to_its_work_and_parameters() -> None:
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    params: dict[str, ParameterValue | None] = {
        "mode": "within",
        "size": 3,
        "alpha": 2e-4,
        "k": 2.0,
        "timeout": 1_500_000,
        "priority": 3,
    }
    valid = ok(request(raw_tensor(x), params))
    assert valid.work.shape == SHAPE and valid.work.samples == 2
    assert valid.work.dtype == torch.float32
    assert valid.work.payload.dtype == np.uint8 and valid.work.payload.tobytes() == x.tobytes()
    assert valid.work.model_group == ("within", 3)
    assert dict(valid.work.scalars) == {"alpha": 2e-4, "beta": 0.75, "k": 2.0}  # beta: the configured default
    assert valid.parameters.group == ("within", 3) and valid.parameters.scalars == valid.work.scalars
    assert valid.deadline == ARRIVAL + 1.5
    assert valid.nbytes == x.nbytes == 2 * 4 * 3 * 3 * 4
    assert valid.datatype.wire == "FP32"
    assert valid.output_shape == SHAPE


def test_defaults_apply_when_no_parameters_are_sent() -> None:
    valid = ok(request())
    p = LRN.config.lrn
    assert valid.work.model_group == (p.mode, p.size)
    assert dict(valid.work.scalars) == {"alpha": p.alpha, "beta": p.beta, "k": p.k}
    assert valid.deadline is None


@pytest.mark.parametrize(
    ("wire", "dtype", "field"), [("FP32", np.float32, "fp32_contents"), ("FP64", np.float64, "fp64_contents")]
)
def test_typed_contents_become_the_payload(wire: str, dtype: type[np.generic], field: str) -> None:
    x = np.linspace(-1, 1, int(np.prod(SHAPE))).astype(dtype).reshape(SHAPE)
    tensor = InputTensor("input", wire, SHAPE, contents=x.reshape(-1), contents_fields=(field,))
    valid = ok(request(tensor))
    assert valid.work.payload.tobytes() == x.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert valid.work.dtype == getattr(torch, np.dtype(dtype).name)
    assert valid.nbytes == x.nbytes


def test_a_network_request_resolves_to_class_probabilities(network: NetworkServable) -> None:
    x = np.zeros((3, 3, 32, 32), np.float32)
    valid = ok(request(raw_tensor(x)), network)
    assert valid.output_shape == (3, 10)
    assert valid.work.model_group == () and dict(valid.work.scalars) == {}
    assert valid.work.group == ((3, 32, 32), torch.float32, ())


def test_the_request_is_not_changed() -> None:
    params: dict[str, ParameterValue | None] = {"alpha": 2e-4, "timeout": 5_000, "priority": 1}
    before = dict(params)
    req = request(parameters=params, time_remaining=2.0)
    snapshot = replace(req, parameters=dict(req.parameters))
    ok(req)
    assert params == before  # timeout and priority were not popped, nothing was added
    assert req == snapshot
    ok(request(parameters=MappingProxyType(before)))  # a read-only mapping is fine: nothing writes to it


# ---- deadlines: the timeout parameter and the gRPC deadline ----


def test_timeout_zero_means_no_timeout() -> None:
    assert ok(request(parameters={"timeout": 0})).deadline is None
    assert ok(request(parameters={"timeout": 0}, time_remaining=2.0)).deadline == ARRIVAL + 2.0


def test_timeout_is_microseconds_from_arrival() -> None:
    assert ok(request(parameters={"timeout": 250_000})).deadline == ARRIVAL + 0.25


def test_the_earliest_of_timeout_and_grpc_deadline_applies() -> None:
    assert ok(request(parameters={"timeout": 250_000}, time_remaining=2.0)).deadline == ARRIVAL + 0.25
    assert ok(request(parameters={"timeout": 5_000_000}, time_remaining=2.0)).deadline == ARRIVAL + 2.0
    assert ok(request(time_remaining=2.0)).deadline == ARRIVAL + 2.0


@pytest.mark.parametrize("timeout", [-1, True, False, "100", 1.5], ids=["negative", "true", "false", "string", "float"])
def test_a_bad_timeout_is_refused(timeout: ParameterValue) -> None:
    refused(InvalidArgument, "parameters.timeout", request(parameters={"timeout": timeout}))


# ---- the priority parameter ----


@pytest.mark.parametrize("priority", [0, 7, 2**64 - 1])
def test_a_uint_priority_is_accepted(priority: int) -> None:
    valid = ok(request(parameters={"priority": priority}))
    assert "priority" not in valid.parameters.scalars  # not the model's parameter


@pytest.mark.parametrize("priority", [-1, True, "1", 1.0], ids=["negative", "bool", "string", "float"])
def test_a_bad_priority_is_refused(priority: ParameterValue) -> None:
    refused(InvalidArgument, "parameters.priority", request(parameters={"priority": priority}))


# ---- parameters ----


@pytest.mark.parametrize("name", ["alpha", "timeout", "priority", "bogus"])
def test_a_parameter_without_a_value_is_refused(name: str) -> None:
    exc = refused(InvalidArgument, f"parameters.{name}", request(parameters={"size": 3, name: None}))
    assert exc.message == f"parameters.{name}: parameter has no value"


def test_an_unknown_parameter_is_refused(network: NetworkServable) -> None:
    exc = refused(InvalidArgument, "parameters.bogus", request(parameters={"bogus": 1}))
    assert "unknown parameter" in exc.message
    x = np.zeros((1, 3, 32, 32), np.float32)
    refused(InvalidArgument, "parameters.alpha", request(raw_tensor(x), {"alpha": 1e-4}), network)  # LRN's, not its


def test_size_is_capped_at_4096() -> None:
    x = np.ones((1, 2, 2, 2), np.float32)
    assert ok(request(raw_tensor(x), {"size": 4096})).work.model_group == ("across", 4096)
    exc = refused(InvalidArgument, "parameters.size", request(raw_tensor(x), {"size": 4097}))
    assert "4096" in exc.message
    refused(InvalidArgument, "parameters.size", request(raw_tensor(x), {"size": 0}))
    refused(InvalidArgument, "parameters.size", request(raw_tensor(x), {"size": 2.5}))


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf"), 1e39, "0.1", True])
def test_alpha_out_of_range_is_refused(alpha: ParameterValue) -> None:
    refused(InvalidArgument, "parameters.alpha", request(parameters={"alpha": alpha}))


@pytest.mark.parametrize(("name", "value"), [("k", 0.0), ("beta", float("nan")), ("mode", "sideways")])
def test_other_lrn_parameters_out_of_range_are_refused(name: str, value: ParameterValue) -> None:
    refused(InvalidArgument, f"parameters.{name}", request(parameters={name: value}))


def test_a_request_too_costly_to_compute_is_refused() -> None:
    x = np.zeros((1, 4096, 24, 24), np.float32)  # 2.4M elements
    assert ok(request(raw_tensor(x), {"size": 5})).work.model_group == ("across", 5)
    # 4095 additions per element: 9.7e9, over the limit of 2^33 (8.6e9)
    exc = refused(ResourceExhausted, "parameters.size", request(raw_tensor(x), {"size": 4095}))
    assert "additions" in exc.message


# ---- the input tensor ----


def test_contents_in_two_typed_fields_are_refused() -> None:
    tensor = InputTensor("input", "FP32", SHAPE, contents_fields=("fp32_contents", "fp64_contents"))
    exc = refused(InvalidArgument, "inputs[0].contents", request(tensor))
    assert "fp32_contents and fp64_contents" in exc.message


def test_raw_and_typed_contents_together_are_refused() -> None:
    x = np.zeros(SHAPE, np.float32)
    tensor = InputTensor(
        "input", "FP32", SHAPE, raw=x.tobytes(), contents=x.reshape(-1), contents_fields=("fp32_contents",)
    )
    refused(InvalidArgument, "inputs[0].contents", request(tensor))


def test_raw_bytes_must_match_the_shape() -> None:
    x = np.zeros(SHAPE, np.float32)
    exc = refused(InvalidArgument, "raw_input_contents[0]", request(replace(raw_tensor(x), raw=x.tobytes()[:-4])))
    assert "284 bytes" in exc.message and "needs 288 bytes" in exc.message
    refused(InvalidArgument, "raw_input_contents[0]", request(replace(raw_tensor(x), raw=x.tobytes() + b"\0" * 4)))


def test_typed_contents_must_match_the_shape() -> None:
    values = np.zeros(int(np.prod(SHAPE)) - 1, np.float32)
    tensor = InputTensor("input", "FP32", SHAPE, contents=values, contents_fields=("fp32_contents",))
    exc = refused(InvalidArgument, "inputs[0].contents.fp32_contents", request(tensor))
    assert "71 values" in exc.message


def test_contents_must_be_in_the_datatypes_own_field() -> None:
    values = np.zeros(int(np.prod(SHAPE)), np.float64)
    fp32_in_fp64 = InputTensor("input", "FP32", SHAPE, contents=values, contents_fields=("fp64_contents",))
    refused(InvalidArgument, "inputs[0].contents.fp64_contents", request(fp32_in_fp64))
    fp16 = InputTensor("input", "FP16", SHAPE, contents=values.astype(np.float32), contents_fields=("fp32_contents",))
    exc = refused(InvalidArgument, "inputs[0].contents", request(fp16))
    assert "raw_input_contents" in exc.message


def test_a_tensor_without_data_is_refused() -> None:
    refused(InvalidArgument, "inputs[0]: no tensor data", request(InputTensor("input", "FP32", SHAPE)))


@pytest.mark.parametrize("datatype", ["INT8", "fp32", "BYTES", ""])
def test_an_unknown_datatype_is_refused(datatype: str) -> None:
    tensor = replace(raw_tensor(np.zeros(SHAPE, np.float32)), datatype=datatype)
    refused(InvalidArgument, "inputs[0].datatype", request(tensor))


@pytest.mark.parametrize("shape", [(4, 3, 3), (1, 2, 4, 3, 3), (), (2, 0, 3, 3), (2, -4, 3, 3)])
def test_a_bad_shape_is_refused(shape: tuple[int, ...]) -> None:
    refused(InvalidArgument, "inputs[0].shape", request(InputTensor("input", "FP32", shape, raw=b"")))


def test_a_network_refuses_another_sample_shape(network: NetworkServable) -> None:
    x = np.zeros((1, 3, 28, 28), np.float32)
    exc = refused(InvalidArgument, "inputs[0].shape", request(raw_tensor(x)), network)
    assert "3, 32, 32" in exc.message


def test_a_wrong_input_name_is_refused() -> None:
    tensor = raw_tensor(np.zeros(SHAPE, np.float32), name="images")
    exc = refused(InvalidArgument, "inputs[0].name", request(tensor))
    assert "'images'" in exc.message and "'input'" in exc.message


def test_exactly_one_input_is_required() -> None:
    tensor = raw_tensor(np.zeros(SHAPE, np.float32))
    refused(InvalidArgument, "inputs:", replace(request(tensor), inputs=()))
    refused(InvalidArgument, "inputs:", replace(request(tensor), inputs=(tensor, tensor), raw_count=2))


def test_raw_entries_must_match_the_inputs() -> None:
    refused(InvalidArgument, "raw_input_contents", replace(request(), raw_count=2))


def test_an_unknown_output_is_refused() -> None:
    ok(request(requested_outputs=("output",)))
    refused(InvalidArgument, "outputs[1].name", request(requested_outputs=("output", "logits")))


# ---- limits ----


def test_more_samples_than_the_model_allows_is_resource_exhausted() -> None:
    limits = replace(LIMITS, max_request_samples=2)
    assert ok(request(), limits=limits).work.samples == 2
    x = np.zeros((3, 4, 3, 3), np.float32)
    exc = refused(ResourceExhausted, "inputs[0].shape", request(raw_tensor(x)), limits=limits)
    assert "3 samples" in exc.message and "limit of 2" in exc.message


def test_too_many_elements_is_resource_exhausted() -> None:
    elements = int(np.prod(SHAPE))
    assert ok(request(), limits=replace(LIMITS, max_tensor_elements=elements)).nbytes == elements * 4
    exc = refused(ResourceExhausted, "inputs[0]", request(), limits=replace(LIMITS, max_tensor_elements=elements - 1))
    assert f"{elements} elements" in exc.message


def test_too_many_bytes_is_resource_exhausted() -> None:
    nbytes = int(np.prod(SHAPE)) * 4
    assert ok(request(), limits=replace(LIMITS, max_tensor_bytes=nbytes)).nbytes == nbytes
    exc = refused(ResourceExhausted, "inputs[0]", request(), limits=replace(LIMITS, max_tensor_bytes=nbytes - 1))
    assert "limit per tensor" in exc.message


def test_limits_are_checked_before_the_data() -> None:
    """A huge declared shape is refused for its size, not read (there is no data at all here)."""
    exc = refused(ResourceExhausted, "inputs[0]", request(InputTensor("input", "FP32", (1024, 1024, 1024, 1024))))
    assert "elements" in exc.message
    refused(InvalidArgument, "inputs[0].shape", request(InputTensor("input", "FP32", (2**32, 2**32, 2**32, 1))))
