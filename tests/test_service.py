"""The gRPC service end to end: a real server on 127.0.0.1:0, a real channel, raw stubs."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from harness import (
    GatedLRN,
    ServerThread,
    gated_server,
    infer_request,
    join_all,
    lrn_model,
    output_array,
    requests_counted,
    settings,
    stub,
    wait_until,
)

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc
from lrnserve.server.ops import local_response_norm
from lrnserve.server.settings import ModelConfig

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = settings(
        lrn_model("lrn", max_batch_size=32, max_queue_delay_us=2000),
        ModelConfig(name="cifar10_full", kind="cifar10_full"),
        max_message_bytes=64 * 1024 * 1024,
    )
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with server.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[ServerThread, GatedLRN]]:
    """A server of one gated LRN model (one instance): tests hold its batches at will."""
    running, probes = gated_server(settings(lrn_model("lrn", max_batch_size=32, max_queue_delay_us=2000)))
    with running:
        yield running, probes["lrn"]


def statistics(channel: grpc.Channel, model: str) -> Any:
    (entry,) = stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats
    return entry


def queue_depth(running: ServerThread) -> int:
    batcher = running.server.repository.get("lrn").batcher
    assert batcher is not None
    return batcher.queue_depth


@contextmanager
def instance_held(running: ServerThread, gated: GatedLRN, channel: grpc.Channel) -> Iterator[None]:
    """The model's one instance busy with a blocker request (filled with -1) until the block ends;
    then the blocker must get its answer."""
    gated.started.clear()
    gated.gate.clear()
    blocker = stub(channel).ModelInfer.future(infer_request("lrn", np.full((1, 2, 3, 3), -1.0, np.float32)), timeout=30)
    try:
        assert gated.started.wait(10), "the blocker never started computing"
        yield
    finally:
        gated.gate.set()
    assert output_array(blocker.result(timeout=30)).shape == (1, 2, 3, 3)


def expect_error(call: object, request: object, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)  # type: ignore[operator]
    error = info.value
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()
    return str(error.details())


def test_live_ready_and_metadata(channel: grpc.Channel) -> None:
    client = stub(channel)
    assert client.ServerLive(pb.ServerLiveRequest()).live
    assert client.ServerReady(pb.ServerReadyRequest()).ready
    assert client.ModelReady(pb.ModelReadyRequest(name="lrn")).ready
    assert client.ModelReady(pb.ModelReadyRequest(name="cifar10_full", version="1")).ready
    meta = client.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "lrnserve" and meta.version
    lrn = client.ModelMetadata(pb.ModelMetadataRequest(name="lrn"))
    assert (lrn.name, lrn.platform, list(lrn.versions)) == ("lrn", "pytorch", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in lrn.inputs] == [("input", "FP32", [-1, -1, -1, -1])]
    assert [(t.name, list(t.shape)) for t in lrn.outputs] == [("output", [-1, -1, -1, -1])]
    cifar = client.ModelMetadata(pb.ModelMetadataRequest(name="cifar10_full"))
    assert [list(t.shape) for t in cifar.inputs] == [[-1, 3, 32, 32]]
    assert [(t.name, list(t.shape)) for t in cifar.outputs] == [("probabilities", [-1, 10])]


def test_health_service_overall_and_per_model(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "lrn", "cifar10_full", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
    expect_error(health.Check, health_pb2.HealthCheckRequest(service="nope"), CODE.NOT_FOUND, "nope")


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(reflect.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["across", "within"])
def test_infer_every_dtype_matches_the_op(channel: grpc.Channel, dtype: torch.dtype, mode: str) -> None:
    x = (torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(1)) * 20).to(dtype)
    params = {"mode": mode, "size": 3, "alpha": 0.3, "beta": 0.6, "k": 2}
    response = stub(channel).ModelInfer(infer_request("lrn", x, params), timeout=30)
    out = response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == (
        "output",
        infer_request("lrn", x).inputs[0].datatype,
        [2, 7, 5, 6],
    )
    expected = local_response_norm(x, 3, 0.3, 0.6, 2.0, mode).float().numpy()
    np.testing.assert_array_equal(output_array(response).astype(np.float32), expected)


def test_typed_contents_input(channel: grpc.Channel) -> None:
    x = np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32)
    response = stub(channel).ModelInfer(infer_request("lrn", x, raw=False), timeout=30)
    expected = local_response_norm(torch.from_numpy(x), 5).numpy()
    np.testing.assert_array_equal(output_array(response), expected)


def test_model_defaults_apply_when_parameters_are_absent(channel: grpc.Channel) -> None:
    x = np.random.default_rng(1).standard_normal((1, 9, 4, 4)).astype(np.float32)
    response = stub(channel).ModelInfer(infer_request("lrn", x), timeout=30)
    expected = local_response_norm(torch.from_numpy(x), 5, 1e-4, 0.75, 1.0, "across").numpy()
    np.testing.assert_array_equal(output_array(response), expected)


def test_network_inference(channel: grpc.Channel, server: ServerThread) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    response = stub(channel).ModelInfer(infer_request("cifar10_full", x), timeout=30)
    y = output_array(response)
    assert y.shape == (3, 10)
    servable = server.server.repository.get("cifar10_full").servable
    with torch.inference_mode():
        expected = servable.network(x).numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-7)


def test_messages_larger_than_4mib_both_ways(channel: grpc.Channel) -> None:
    x = torch.randn(1, 96, 120, 120)  # 5.5 MB each way
    assert x.numel() * 4 > 4 * 1024 * 1024
    response = stub(channel).ModelInfer(infer_request("lrn", x), timeout=60)
    np.testing.assert_array_equal(output_array(response), local_response_norm(x, 5).numpy())


def test_concurrent_requests_with_different_parameters_each_get_their_own_answer(
    gated: tuple[ServerThread, GatedLRN],
) -> None:
    running, model = gated
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, 6, 4, 4)).astype(np.float32) for _ in range(64)]
    params = [
        {
            "alpha": float(rng.uniform(0, 2)),
            "beta": float(rng.uniform(0.1, 1.5)),
            "k": float(rng.uniform(0.5, 3)),
        }
        for _ in range(64)
    ]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(channel: grpc.Channel, i: int) -> None:
        try:
            response = stub(channel).ModelInfer(infer_request("lrn", xs[i], params[i]), timeout=60)
            results[i] = output_array(response)
        except BaseException as exc:  # asserted in the test's thread
            errors.append(exc)

    with running.channel() as channel:
        before = statistics(channel, "lrn")
        # All 64 queue behind a held batch, so that they are batched together whatever the timing.
        with instance_held(running, model, channel):
            threads = [threading.Thread(target=call, args=(channel, i)) for i in range(64)]
            for t in threads:
                t.start()
            wait_until(lambda: queue_depth(running) == 64, "64 requests queued behind the held batch")
        join_all(threads, timeout=60)
        after = statistics(channel, "lrn")
    assert not errors, errors[:3]
    assert sorted(results) == list(range(64))
    for i in range(64):
        p = params[i]
        expected = local_response_norm(torch.from_numpy(xs[i]), 5, p["alpha"], p["beta"], p["k"]).numpy()
        np.testing.assert_allclose(results[i], expected, rtol=1e-6, err_msg=f"request {i}")
    # They really were batched together (else the per-sample parameters went untested): the
    # server counts 64 + 1 (the blocker) samples in far fewer executions than requests.
    assert after.inference_count - before.inference_count == 65
    executions = after.execution_count - before.execution_count
    assert 1 + 2 <= executions < 65, executions  # max_batch_size 32: at least two batches for the 64


# ---- every status-code branch ----


def good(model: str = "lrn", **params: bool | int | float | str) -> pb.ModelInferRequest:
    return infer_request(model, np.ones((1, 2, 3, 3), np.float32), params)


def edited(request: pb.ModelInferRequest, **changes: object) -> pb.ModelInferRequest:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(request)
    for key, value in changes.items():
        if key == "shape":
            del copy.inputs[0].shape[:]
            copy.inputs[0].shape.extend(value)  # type: ignore[arg-type]
        elif key == "raw":
            del copy.raw_input_contents[:]
            copy.raw_input_contents.extend(value)  # type: ignore[arg-type]
        elif key in ("name", "datatype"):
            setattr(copy.inputs[0], key, value)
        else:
            setattr(copy, key, value)
    return copy


INVALID: Mapping[str, tuple[pb.ModelInferRequest, tuple[str, ...]]] = {
    "unknown datatype": (
        edited(good(), datatype="INT8"),
        ("inputs[0].datatype", "INT8", "FP32, FP64, FP16, BF16"),
    ),
    "rank 3": (
        edited(good(), shape=[2, 3, 3], raw=[b"\0" * 72]),
        ("inputs[0].shape", "4 dimensions", "[2, 3, 3]"),
    ),
    "zero dim": (edited(good(), shape=[1, 0, 3, 3], raw=[b""]), ("inputs[0].shape", ">= 1")),
    "negative dim": (edited(good(), shape=[1, -2, 3, 3]), ("inputs[0].shape", ">= 1", "-2")),
    "bytes mismatch": (
        edited(good(), raw=[b"\0" * 71]),
        ("raw_input_contents[0]", "71 bytes", "needs 72 bytes"),
    ),
    "two raw entries": (edited(good(), raw=[b"\0" * 72, b"\0" * 72]), ("raw_input_contents", "2 entries")),
    "no data": (edited(good(), raw=[]), ("inputs[0]", "no tensor data")),
    "input name": (edited(good(), name="images"), ("inputs[0].name", "'images'", "'input'")),
    "unknown parameter": (good(sizee=3), ("parameters.sizee", "accepted: mode, size, alpha, beta, k")),
    "mode": (good(mode="spatial"), ("parameters.mode must be one of 'across', 'within', got 'spatial'",)),
    "size type": (good(size=2.5), ("parameters.size must be an integer >= 1 (and <= 4096), got 2.5",)),
    "size range": (good(size=0), ("parameters.size must be an integer >= 1 (and <= 4096), got 0",)),
    "size too large": (good(size=4097), ("parameters.size must be an integer >= 1 (and <= 4096), got 4097",)),
    "alpha negative": (
        good(alpha=-1.0),
        ("parameters.alpha must be a finite number >= 0 (and <= 3.403e+38), got -1.0",),
    ),
    "alpha too large": (good(alpha=1e39), ("parameters.alpha must be a finite number >= 0 (and <= 3.403e+38)",)),
    "alpha type": (good(alpha="big"), ("parameters.alpha must be a number, got 'big'",)),
    "beta nan": (good(beta=float("nan")), ("parameters.beta must be a finite number, got nan",)),
    "k zero": (good(k=0), ("parameters.k must be a finite number > 0 (and <= 3.403e+38), got 0",)),
    "timeout type": (good(timeout="soon"), ("parameters.timeout", "microseconds")),
    "network shape": (
        infer_request("cifar10_full", np.ones((1, 3, 30, 30), np.float32)),
        ("inputs[0].shape", "[N, 3, 32, 32]", "cifar10_full"),
    ),
    "network parameter": (
        infer_request("cifar10_full", np.ones((1, 3, 32, 32), np.float32), {"alpha": 1.0}),
        ("parameters.alpha", "cifar10_full"),
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_argument_names_the_field(channel: grpc.Channel, case: str) -> None:
    request, fragments = INVALID[case]
    expect_error(stub(channel).ModelInfer, request, CODE.INVALID_ARGUMENT, *fragments)


def test_two_inputs_and_unknown_output(channel: grpc.Channel) -> None:
    request = good()
    request.inputs.add(name="input2", datatype="FP32", shape=[1])
    expect_error(stub(channel).ModelInfer, request, CODE.INVALID_ARGUMENT, "inputs", "exactly 1 input")
    request = good()
    request.outputs.add(name="probabilities")
    expect_error(stub(channel).ModelInfer, request, CODE.INVALID_ARGUMENT, "outputs[0].name", "'output'")


def test_typed_contents_errors(channel: grpc.Channel) -> None:
    half = infer_request("lrn", np.ones((1, 1, 2, 2), np.float16))
    del half.raw_input_contents[:]
    half.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    expect_error(
        stub(channel).ModelInfer,
        half,
        CODE.INVALID_ARGUMENT,
        "FP16 tensors must be sent in raw_input_contents",
    )
    short = infer_request("lrn", np.ones((1, 1, 2, 2), np.float32), raw=False)
    del short.inputs[0].contents.fp32_contents[-1]
    expect_error(stub(channel).ModelInfer, short, CODE.INVALID_ARGUMENT, "fp32_contents", "3 values", "has 4")
    both = infer_request("lrn", np.ones((1, 1, 2, 2), np.float32), raw=False)
    both.inputs[0].contents.fp64_contents.extend([1.0] * 4)
    expect_error(stub(channel).ModelInfer, both, CODE.INVALID_ARGUMENT, "fp32_contents and fp64_contents")


def test_not_found(channel: grpc.Channel) -> None:
    client = stub(channel)
    expect_error(client.ModelInfer, good("vgg"), CODE.NOT_FOUND, "model 'vgg'", "models: lrn, cifar10_full")
    expect_error(client.ModelInfer, edited(good(), model_version="2"), CODE.NOT_FOUND, "version '2'")
    expect_error(client.ModelMetadata, pb.ModelMetadataRequest(name="vgg"), CODE.NOT_FOUND, "vgg")
    expect_error(client.ModelReady, pb.ModelReadyRequest(name="vgg"), CODE.NOT_FOUND, "vgg")


def test_tensor_over_the_size_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    # Claimed shape over the per-tensor limit: refused before any allocation.
    request = edited(good(), shape=[1024, 1024, 1024, 16], raw=[b""])
    expect_error(stub(channel).ModelInfer, request, CODE.RESOURCE_EXHAUSTED, "inputs[0]", "limit")
    # An actual message over the transport limit.
    big = infer_request("lrn", np.zeros((1, 1, 4200, 4200), np.float32))  # 70.6 MB > 64 MiB
    expect_error(stub(channel).ModelInfer, big, CODE.RESOURCE_EXHAUSTED)


def test_unexpected_failure_is_internal_with_a_generic_message(gated: tuple[ServerThread, GatedLRN]) -> None:
    running, model = gated
    with running.channel() as channel:
        model.failure = RuntimeError("secret internal detail")
        try:
            computed = len(model.batches)
            details = expect_error(stub(channel).ModelInfer, good(), CODE.INTERNAL, "internal")
            assert "secret" not in details
            assert len(model.batches) == computed + 1  # it failed inside its batch
        finally:
            model.failure = None
        # The server keeps serving.
        response = stub(channel).ModelInfer(good(), timeout=30)
        np.testing.assert_array_equal(output_array(response), local_response_norm(torch.ones(1, 2, 3, 3), 5).numpy())


# ---- deadlines: the server's own (the timeout parameter) and the caller's (gRPC) ----


def test_timeout_parameter_expires_while_queued(gated: tuple[ServerThread, GatedLRN]) -> None:
    running, model = gated
    port = running.server.metrics_port
    assert port
    expired_before = requests_counted(port, "lrn", "DEADLINE_EXCEEDED")
    x = np.full((1, 2, 3, 3), 7.0, np.float32)
    with running.channel() as channel, instance_held(running, model, channel):
        call = stub(channel).ModelInfer.future(infer_request("lrn", x, {"timeout": 1_000_000}), timeout=30)
        wait_until(lambda: queue_depth(running) == 1, "the request queued behind the held batch")
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=30)  # the held batch never finishes first: the server's timer fires
        assert info.value.code() == CODE.DEADLINE_EXCEEDED, info.value.details()
        assert "in the queue" in info.value.details()
        assert queue_depth(running) == 0
    assert requests_counted(port, "lrn", "DEADLINE_EXCEEDED") == expired_before + 1
    assert 7.0 not in [v for batch in model.batches for v in batch]  # it never computed


def test_caller_cancelling_while_queued_is_counted_cancelled(gated: tuple[ServerThread, GatedLRN]) -> None:
    running, model = gated
    port = running.server.metrics_port
    assert port
    cancelled_before = requests_counted(port, "lrn", "CANCELLED")
    expired_before = requests_counted(port, "lrn", "DEADLINE_EXCEEDED")
    x = np.full((1, 2, 3, 3), 8.0, np.float32)
    with running.channel() as channel, instance_held(running, model, channel):
        call = stub(channel).ModelInfer.future(infer_request("lrn", x), timeout=30)
        wait_until(lambda: queue_depth(running) == 1, "the request queued behind the held batch")
        assert call.cancel()
        wait_until(
            lambda: requests_counted(port, "lrn", "CANCELLED") == cancelled_before + 1,
            "the server counted the cancelled request",
        )
        assert queue_depth(running) == 0  # it left the queue at once
    assert requests_counted(port, "lrn", "DEADLINE_EXCEEDED") == expired_before
    assert 8.0 not in [v for batch in model.batches for v in batch]


def test_caller_deadline_passing_while_queued_is_counted_deadline_exceeded(
    gated: tuple[ServerThread, GatedLRN],
) -> None:
    running, model = gated
    port = running.server.metrics_port
    assert port

    def counted() -> tuple[float, float]:
        return requests_counted(port, "lrn", "DEADLINE_EXCEEDED"), requests_counted(port, "lrn", "CANCELLED")

    expired_before, cancelled_before = counted()
    x = np.full((1, 2, 3, 3), 9.0, np.float32)
    with running.channel() as channel, instance_held(running, model, channel):
        # Three callers whose own gRPC deadline (no timeout parameter) passes while they wait.
        calls = [stub(channel).ModelInfer.future(infer_request("lrn", x), timeout=3.0) for _ in range(3)]
        wait_until(lambda: queue_depth(running) == 3, "the requests queued behind the held batch", timeout=2.9)
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=30)
            assert info.value.code() == CODE.DEADLINE_EXCEEDED
        wait_until(lambda: sum(counted()) == expired_before + cancelled_before + 3, "the server counted all three")
        assert queue_depth(running) == 0
    expired, cancelled = counted()
    assert (expired - expired_before, cancelled - cancelled_before) == (3, 0), (
        "a caller's deadline that passed must be counted DEADLINE_EXCEEDED, not CANCELLED"
    )
    assert 9.0 not in [v for batch in model.batches for v in batch]


def test_unavailable_while_draining(server: ServerThread, channel: grpc.Channel) -> None:
    server.server.dataplane.draining = True
    try:
        expect_error(stub(channel).ModelInfer, good(), CODE.UNAVAILABLE, "shutting down")
        assert not stub(channel).ServerReady(pb.ServerReadyRequest()).ready
    finally:
        server.server.dataplane.draining = False
    model = server.server.repository.get("lrn")
    model.ready = False
    try:
        expect_error(stub(channel).ModelInfer, good(), CODE.UNAVAILABLE, "not ready")
        assert not stub(channel).ModelReady(pb.ModelReadyRequest(name="lrn")).ready
    finally:
        model.ready = True
