"""Request buffers die with their request: no reference cycle or idle thread keeps a received
message, a batch or an answer alive after the call ended (issue: memory within its promise).

The server runs in this process with the cyclic garbage collector off, so anything that only a
collection would free shows up as a live allocation; tracemalloc sees every large buffer the
server allocated (received messages, batch outputs, responses) after it started.
"""

from __future__ import annotations

import gc
import queue
import time
import tracemalloc
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from harness import (
    ServerThread,
    gated_server,
    infer_request,
    lrn_model,
    metric_value,
    scrape,
    settings,
    stub,
    wait_until,
)

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

MIB = 1 << 20
TENSOR = np.ones((1, 2, 1024, 1024), np.float32)  # 8 MiB


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = settings(lrn_model("lrn"), max_message_bytes=64 * MIB, max_inflight_bytes=40 * MIB)
    with ServerThread(config) as running:
        yield running


def large_live_allocations(timeout: float = 10.0) -> list[tracemalloc.Trace]:
    """The server's large buffers still alive, once they had ``timeout`` seconds to go: the
    client hears the status a moment before the server's call task lets go of its request."""
    deadline = time.monotonic() + timeout
    while True:
        live = [t for t in tracemalloc.take_snapshot().traces if t.size >= 4 * MIB]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.02)


def send(channel: grpc.Channel, request: pb.ModelInferRequest) -> grpc.StatusCode:
    try:
        stub(channel).ModelInfer(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


CASES = {
    "ok": ("lrn", {}, grpc.StatusCode.OK),
    "invalid": ("lrn", {"alpha": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
    "not found": ("vgg", {}, grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_buffer_outlives_its_call(server: ServerThread, case: str) -> None:
    model, parameters, expected = CASES[case]
    request = infer_request(model, TENSOR, parameters)  # built before tracing: the client's own
    with server.channel() as channel:
        assert send(channel, request) == expected  # warm up the channel and the server's pools
        with _traced():
            for _ in range(4):
                assert send(channel, request) == expected
            live = large_live_allocations()
    assert not live, "buffers still alive after their calls ended:\n" + "\n".join(
        f"{t.size / MIB:.0f} MiB from " + " <- ".join(f"{f.filename}:{f.lineno}" for f in reversed(t.traceback[-3:]))
        for t in live
    )


@pytest.mark.parametrize("case", list(CASES))
def test_no_buffer_outlives_its_answer_on_a_stream(server: ServerThread, case: str) -> None:
    """The same for ModelStreamInfer: each request's buffers go once its answer is sent, while
    the stream stays open, and the call itself once the stream ends."""
    model, parameters, expected = CASES[case]
    request = infer_request(model, TENSOR, parameters)
    end = object()
    with server.channel() as channel:
        with _traced():
            outbox: queue.Queue[object] = queue.Queue()
            outbox.put(request)
            answers = stub(channel).ModelStreamInfer(iter(outbox.get, end), timeout=60)
            for sent in range(1, 5):  # one at a time: each request's 32 MiB fit the 40 MiB budget alone
                answer = next(answers)
                assert bool(answer.error_message) == (expected != grpc.StatusCode.OK), answer.error_message
                outbox.put(request if sent < 4 else end)
            with pytest.raises(StopIteration):
                next(answers)
            del answer, answers
            live = large_live_allocations()
        assert server.server.metrics_port is not None
        port = server.server.metrics_port
        wait_until(lambda: metric_value(scrape(port), "lrnserve_calls_in_progress") == 0, "the stream ended")
    assert not live, "buffers still alive after the stream's answers:\n" + "\n".join(
        f"{t.size / MIB:.0f} MiB from " + " <- ".join(f"{f.filename}:{f.lineno}" for f in reversed(t.traceback[-3:]))
        for t in live
    )


def test_a_request_refused_for_the_inflight_budget_leaves_nothing_behind(server: ServerThread) -> None:
    # An 8 MiB request holds 32 MiB (its message and three times its output): it fits the
    # 40 MiB budget; this one's 48 MiB message is refused on receipt, and dropped.
    big = infer_request("lrn", np.ones((1, 12, 1024, 1024), np.float32))
    with server.channel() as channel, _traced():
        for _ in range(4):
            assert send(channel, big) == grpc.StatusCode.RESOURCE_EXHAUSTED
        live = large_live_allocations()
    assert [t.size for t in live] == []


class _traced:
    """tracemalloc on and the cyclic collector off, for the block."""

    def __enter__(self) -> None:
        self._enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        tracemalloc.start(8)

    def __exit__(self, *exc: object) -> None:
        tracemalloc.stop()
        if self._enabled:
            gc.enable()


def test_the_byte_budget_is_given_back_when_a_call_ends_not_at_its_deadline(server: ServerThread) -> None:
    """A call with a long deadline arms a timer in the batcher, cancelled when the call ends:
    nothing may hold the call's share of the budget, or the call, until that deadline."""
    request = infer_request("lrn", np.ones((1, 2, 64, 64), np.float32))
    with server.channel() as channel:
        for _ in range(3):
            stub(channel).ModelInfer(request, timeout=600)  # a deadline ten minutes away
    wait_until(lambda: server.server.dataplane.inflight_bytes == 0, "the budget given back")
    assert server.server.metrics_port is not None
    port = server.server.metrics_port
    wait_until(lambda: metric_value(scrape(port), "lrnserve_calls_in_progress") == 0, "the calls ended")


def test_a_request_failed_by_its_batcher_releases_its_call_without_a_collection() -> None:
    """A batch failure reaches the request as an exception set on its queue entry's future; the
    exception's traceback holds the frame that awaited it. Nothing of that may keep the call (and
    its share of the byte budget) alive once the call ended, with the collector off."""
    running, probes = gated_server(settings(lrn_model("lrn")))
    with running, running.channel() as channel:
        probes["lrn"].failure = RuntimeError("model failure")
        request = infer_request("lrn", np.ones((1, 2, 64, 64), np.float32))
        port = running.server.metrics_port
        assert port is not None
        enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                assert send(channel, request) == grpc.StatusCode.INTERNAL
            wait_until(lambda: metric_value(scrape(port), "lrnserve_calls_in_progress") == 0, "the failed calls ended")
            assert running.server.dataplane.inflight_bytes == 0
        finally:
            if enabled:
                gc.enable()
