"""ModelStreamInfer over real gRPC: answers by id in any order, errors that do not end the
stream, back-pressure per stream, cancellation and drain."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import queue
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from harness import (
    ServerThread,
    gated_server,
    infer_request,
    lrn_model,
    metric_value,
    output_array,
    scrape,
    settings,
    stub,
    wait_until,
)

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.settings import Secret
from reference import lrn_reference

WAIT = 30.0
END = object()


class Stream:
    """One ModelStreamInfer call whose requests the test sends one by one."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.Queue[Any] = queue.Queue()
        self.call = stub(channel).ModelStreamInfer(iter(self._outbox.get, END), timeout=120)

    def send(self, request: pb.ModelInferRequest) -> None:
        self._outbox.put(request)

    def close(self) -> None:
        self._outbox.put(END)

    def receive(self) -> pb.ModelStreamInferResponse:
        return next(self.call)


def lrn_request(
    model: str, fill: float, request_id: str, shape: tuple[int, ...] = (1, 4, 3, 3)
) -> pb.ModelInferRequest:
    request = infer_request(model, np.full(shape, fill, np.float32))
    request.id = request_id
    return request


def expected(fill: float, shape: tuple[int, ...] = (1, 4, 3, 3), k: float = 1.0) -> np.ndarray:
    return lrn_reference(np.full(shape, fill, np.float64), 5, 1e-4, 0.75, k, "across")


def answered(response: pb.ModelStreamInferResponse) -> tuple[str, np.ndarray]:
    assert not response.error_message, response.error_message
    return response.infer_response.id, output_array(response.infer_response)


def success_count(channel: grpc.Channel, model: str) -> int:
    request = pb.ModelStatisticsRequest(name=model)
    (entry,) = stub(channel).ModelStatistics(request, timeout=10).model_stats
    return int(entry.inference_stats.success.count)


def calls_in_progress(running: ServerThread) -> float | None:
    port = running.server.metrics_port
    assert port
    return metric_value(scrape(port), "lrnserve_calls_in_progress")


def queue_depth(running: ServerThread, model: str = "lrn") -> int:
    batcher = running.server.repository.get(model).batcher
    assert batcher is not None
    return batcher.queue_depth


@pytest.fixture
def two_models() -> Iterator[tuple[ServerThread, Any]]:
    """``lrn`` and ``slow``, both gated LRN models computing one request per batch."""
    models = (lrn_model("lrn", max_batch_size=1, max_queue_delay_us=0), lrn_model("slow", max_batch_size=1))
    running, probes = gated_server(settings(*models, max_stream_inflight=2))
    with running:
        yield running, probes


# tritonclient registers its own ``inference.*`` protobuf messages, which clash with lrnserve's in
# one process: it runs in a child process (as in test_interop_triton).
TRITON_STREAM = textwrap.dedent(
    """
    import json, queue, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    target, out = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(target)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    x = np.random.default_rng(5).standard_normal((1, 6, 4, 4)).astype(np.float32)
    for i in range(12):
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x * (i + 1))
        model, parameters = {0: ("lrn", {"k": float(i + 1)}), 1: ("absent", {}), 2: ("lrn", {"size": -3})}[i % 3]
        client.async_stream_infer(model, [tensor], request_id=str(i), parameters=parameters)
    outcomes = [results.get(timeout=60) for _ in range(12)]
    client.stop_stream()
    arrays = {"x": x}
    errors = []
    for result, error in outcomes:
        if error is None:
            arrays["id_" + result.get_response().id] = result.as_numpy("output")
        else:
            errors.append(error.message())
    np.savez(out + "/arrays.npz", **arrays)
    with open(out + "/errors.json", "w") as fh:
        json.dump(errors, fh)
    """
)


def test_tritonclient_stream_answers_each_request_and_errors_do_not_end_it(
    two_models: tuple[ServerThread, Any], tmp_path: Path
) -> None:
    if importlib.util.find_spec("tritonclient") is None:  # importing it here would clash (above)
        pytest.skip("tritonclient is not installed")
    running, _ = two_models
    command = [sys.executable, "-c", TRITON_STREAM, running.target, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    arrays = np.load(tmp_path / "arrays.npz")
    x = arrays["x"].astype(np.float64)
    good = {name.removeprefix("id_"): arrays[name] for name in arrays.files if name.startswith("id_")}
    assert sorted(good, key=int) == ["0", "3", "6", "9"]
    for request_id, y in good.items():
        i = int(request_id)
        want = lrn_reference(x * (i + 1), 5, 1e-4, 0.75, i + 1.0, "across")
        np.testing.assert_allclose(y, want, rtol=1e-5)
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert len(errors) == 8
    assert sum("'absent'" in e for e in errors) == 4, errors
    assert sum("parameters.size" in e for e in errors) == 4, errors
    with running.channel() as channel:
        assert success_count(channel, "lrn") == 4  # streamed requests are counted as any others


def test_answers_come_back_as_they_finish_with_their_ids(two_models: tuple[ServerThread, Any]) -> None:
    running, probes = two_models
    probes["slow"].gate.clear()
    with running.channel() as channel:
        stream = Stream(channel)
        try:
            stream.send(lrn_request("slow", 2.0, "first"))
            assert probes["slow"].started.wait(WAIT)
            stream.send(lrn_request("lrn", 3.0, "second"))
            request_id, y = answered(stream.receive())  # the later request, answered first
            assert request_id == "second"
            np.testing.assert_allclose(y, expected(3.0), rtol=1e-6)
            probes["slow"].gate.set()
            request_id, y = answered(stream.receive())
            assert request_id == "first"
            np.testing.assert_allclose(y, expected(2.0), rtol=1e-6)
            stream.close()
            with pytest.raises(StopIteration):
                stream.receive()
            assert stream.call.code() == grpc.StatusCode.OK
            wait_until(lambda: calls_in_progress(running) == 0, "the closed stream's call ended on the server")
        finally:
            probes["slow"].gate.set()
            stream.call.cancel()


def test_a_client_that_stops_reading_stalls_only_its_own_stream(two_models: tuple[ServerThread, Any]) -> None:
    """max_stream_inflight is 2: once gRPC cannot send the stream's 4 MiB answers (the client
    reads none), the server reads no further messages of it, while other calls are served."""
    running, _ = two_models
    shape = (1, 64, 128, 128)
    with running.channel() as reader, running.channel() as other:
        stream = Stream(reader)
        try:
            for i in range(20):
                stream.send(lrn_request("lrn", 1.0 + i, str(i), shape))
            wait_until(lambda: success_count(other, "lrn") >= 2, "the stream's first requests answered", WAIT)
            for i in range(5):
                response = stub(other).ModelInfer(lrn_request("slow", 7.0, f"u{i}"), timeout=WAIT)
                np.testing.assert_allclose(output_array(response), expected(7.0), rtol=1e-6)
            computed = success_count(other, "lrn")
            assert computed <= 12, f"{computed} of the 20 streamed requests computed: nothing held the stream back"
            assert running.server.dataplane.budget.used <= 16 * 4 * 2**20 * 4  # a few requests' bytes, not 20
        finally:
            stream.call.cancel()
        wait_until(lambda: running.server.dataplane.budget.used == 0, "the stream's requests let go of the budget")
        wait_until(lambda: calls_in_progress(running) == 0, "the cancelled stream's call ended on the server")


def test_cancelling_a_stream_drops_its_queued_requests_before_compute(two_models: tuple[ServerThread, Any]) -> None:
    running, probes = two_models
    lrn = probes["lrn"]
    lrn.gate.clear()
    with running.channel() as channel:
        stream = Stream(channel)
        try:
            stream.send(lrn_request("lrn", 1.0, "held"))
            assert lrn.started.wait(WAIT)
            stream.send(lrn_request("lrn", 2.0, "queued"))
            wait_until(lambda: queue_depth(running) == 1, "the second request queued")
            stream.call.cancel()
            wait_until(lambda: queue_depth(running) == 0, "the cancelled stream's queued request left the queue")
        finally:
            lrn.gate.set()
        wait_until(lambda: running.server.dataplane.budget.used == 0, "the held request finished")
        wait_until(lambda: calls_in_progress(running) == 0, "the cancelled stream's call ended on the server")
    assert lrn.batches == [[1.0]]  # the queued one was never computed


def test_drain_answers_what_a_stream_holds_then_ends_it(two_models: tuple[ServerThread, Any]) -> None:
    running, probes = two_models
    lrn = probes["lrn"]
    lrn.gate.clear()
    channel = running.channel()
    stream = Stream(channel)
    try:
        stream.send(lrn_request("lrn", 1.0, "computing"))
        assert lrn.started.wait(WAIT)
        stream.send(lrn_request("lrn", 2.0, "queued"))
        wait_until(lambda: queue_depth(running) == 1, "the second request queued")
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(30.0), running.loop)
        wait_until(lambda: running.server.dataplane.draining, "the drain began")
        with pytest.raises(grpc.RpcError) as refused:
            stub(channel).ModelInfer(lrn_request("lrn", 5.0, "late"), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        lrn.gate.set()
        answers = dict(answered(stream.receive()) for _ in range(2))
        np.testing.assert_allclose(answers["computing"], expected(1.0), rtol=1e-6)
        np.testing.assert_allclose(answers["queued"], expected(2.0), rtol=1e-6)
        with pytest.raises(grpc.RpcError) as ended:
            stream.receive()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(ended.value.details())
        assert stopping.result(timeout=WAIT) is True  # drained: every call begun before it finished
    finally:
        lrn.gate.set()
        stream.call.cancel()
        channel.close()


def test_a_stream_needs_the_token_as_every_inference_call_does() -> None:
    token = (("authorization", "Bearer stream secret"),)
    running = ServerThread(settings(lrn_model("lrn"), token=Secret("stream secret")))
    with running, running.channel() as channel:
        refused = stub(channel).ModelStreamInfer(iter([lrn_request("lrn", 1.0, "x")]), timeout=WAIT)
        with pytest.raises(grpc.RpcError) as error:
            next(refused)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        allowed = stub(channel).ModelStreamInfer(iter([lrn_request("lrn", 1.0, "x")]), timeout=WAIT, metadata=token)
        request_id, y = answered(next(allowed))
        assert request_id == "x"
        np.testing.assert_allclose(y, expected(1.0), rtol=1e-6)


def test_streams_beyond_max_open_streams_are_refused() -> None:
    running = ServerThread(settings(lrn_model("lrn"), max_open_streams=1))
    with running, running.channel() as channel:
        first = Stream(channel)
        try:
            first.send(lrn_request("lrn", 1.0, "a"))
            assert answered(first.receive())[0] == "a"  # the first stream is open, and stays open
            second = stub(channel).ModelStreamInfer(iter([lrn_request("lrn", 2.0, "b")]), timeout=WAIT)
            with pytest.raises(grpc.RpcError) as error:
                next(second)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_open_streams" in str(error.value.details())
            first.close()
            with pytest.raises(StopIteration):
                first.receive()
            wait_until(lambda: calls_in_progress(running) == 0, "the first stream ended on the server")
            third = stub(channel).ModelStreamInfer(iter([lrn_request("lrn", 3.0, "c")]), timeout=WAIT)
            request_id, y = answered(next(third))
            assert request_id == "c"
            np.testing.assert_allclose(y, expected(3.0), rtol=1e-6)
        finally:
            first.call.cancel()


def test_an_idle_open_stream_does_not_hold_off_the_idle_trim() -> None:
    """A stream with nothing in flight is no call at work: the heap is trimmed while it stays open."""
    running = ServerThread(settings(lrn_model("lrn"), idle_trim_seconds=0.2))
    with running, running.channel() as channel:
        stream = Stream(channel)
        try:
            stream.send(lrn_request("lrn", 1.0, "a"))
            assert answered(stream.receive())[0] == "a"
            trims = running.server.trimmer.trims
            wait_until(lambda: running.server.trimmer.trims > trims, "a trim while the stream is open and idle", WAIT)
            assert calls_in_progress(running) == 1  # the stream is still open
        finally:
            stream.call.cancel()
