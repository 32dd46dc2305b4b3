"""Dynamic batching, deterministically: a gated model shows exactly what ran together.

Each test runs a real server with one LRN model whose computation waits on a
gate and records every batch it computes. Requests are told apart by the
constant their tensor is filled with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from harness import GatedLRN, ServerThread, infer_request, lrn_model, output_array, settings, stub

from lrnserve.server.batching import BatchRecord, _WindowMax
from lrnserve.server.ops import local_response_norm

CODE = grpc.StatusCode


class Harness:
    def __init__(self, running: ServerThread) -> None:
        self.running = running
        model = running.server.repository.get("lrn")
        assert model.batcher is not None
        self.batcher = model.batcher
        self.model = GatedLRN(model.batcher.executor.servable)  # type: ignore[arg-type]
        model.batcher.executor.servable = self.model
        self.records: list[BatchRecord] = []
        model.batcher._on_batch = self.records.append
        self.channel = running.channel()
        self.pool = ThreadPoolExecutor(16)

    def send(self, value: float, samples: int = 1, deadline: float = 30, **params: object) -> object:
        """ModelInfer in the background; ``deadline`` is the gRPC one, ``params`` the request's."""
        x = np.full((samples, 4, 3, 3), value, np.float32)
        return self.pool.submit(stub(self.channel).ModelInfer, infer_request("lrn", x, params), timeout=deadline)  # type: ignore[arg-type]

    def wait_queued(self, depth: int) -> None:
        deadline = time.monotonic() + 10
        while self.batcher.queue_depth < depth:
            assert time.monotonic() < deadline, f"queue depth stuck at {self.batcher.queue_depth}"
            time.sleep(0.005)

    def occupy(self) -> object:
        """Send a blocker request and wait until the only instance is busy with it."""
        self.model.gate.clear()
        self.model.started.clear()
        blocker = self.send(-1.0)
        assert self.model.started.wait(timeout=10)
        return blocker


@pytest.fixture
def make_harness() -> Iterator[object]:
    created: list[tuple[ServerThread, Harness]] = []

    def make(**batching: int) -> Harness:
        running = ServerThread(settings(lrn_model("lrn", **batching))).__enter__()
        harness = Harness(running)
        created.append((running, harness))
        return harness

    yield make
    for running, harness in created:
        harness.model.gate.set()
        harness.pool.shutdown(wait=True)
        harness.channel.close()
        running.stop()


def test_full_batch_dispatches_without_waiting_for_the_delay(make_harness: object) -> None:
    h = make_harness(max_batch_size=4, max_queue_delay_us=20_000_000)  # type: ignore[operator]
    blocker = h.occupy()
    futures = [h.send(float(i)) for i in range(4)]
    h.wait_queued(4)  # five requests in the batcher at once: more are expected, but the batch is full
    start = time.monotonic()
    h.model.gate.set()
    for f in [blocker, *futures]:
        f.result(timeout=30)
    assert time.monotonic() - start < 10, "a full batch must not wait for max_queue_delay_us"
    assert [sorted(b) for b in h.model.batches] == [[-1.0], [0.0, 1.0, 2.0, 3.0]]
    assert [r.samples for r in h.records] == [1, 4]


def test_partial_batch_waits_for_the_delay_while_more_are_expected(make_harness: object) -> None:
    h = make_harness(max_batch_size=32, max_queue_delay_us=300_000)  # type: ignore[operator]
    blocker = h.occupy()
    futures = [h.send(float(i)) for i in range(3)]
    h.wait_queued(3)  # four requests were in the batcher at once; three are queued
    h.model.gate.set()
    blocker.result(timeout=30)  # type: ignore[attr-defined]
    done = time.monotonic()
    for f in futures:
        f.result(timeout=30)
    assert [sorted(b) for b in h.model.batches] == [[-1.0], [0.0, 1.0, 2.0]]
    waited = h.records[1].queue_seconds  # the oldest request waited the delay
    assert max(waited) >= 0.3 and time.monotonic() - done >= 0.25, "dispatched a partial batch before the delay"


def test_a_lone_caller_never_waits_for_the_delay(make_harness: object) -> None:
    h = make_harness(max_batch_size=32, max_queue_delay_us=20_000_000)  # type: ignore[operator]
    start = time.monotonic()
    for i in range(3):  # one after another: nobody to wait for
        h.send(float(i)).result(timeout=30)  # type: ignore[attr-defined]
    assert time.monotonic() - start < 10, "a request with no company waited for max_queue_delay_us"
    assert h.model.batches == [[0.0], [1.0], [2.0]]
    assert all(max(r.queue_seconds) < 5 for r in h.records)


def test_batch_is_formed_from_what_queued_while_the_instance_was_busy(make_harness: object) -> None:
    h = make_harness(max_batch_size=8, max_queue_delay_us=0)  # type: ignore[operator]
    blocker = h.occupy()
    futures = [h.send(float(i)) for i in range(10)]
    h.wait_queued(10)
    h.model.gate.set()
    for f in [blocker, *futures]:
        f.result(timeout=30)
    sizes = [len(b) for b in h.model.batches]
    assert sizes == [1, 8, 2]


def test_oversized_request_runs_alone(make_harness: object) -> None:
    h = make_harness(max_batch_size=4, max_queue_delay_us=0)  # type: ignore[operator]
    blocker = h.occupy()
    small = [h.send(float(i)) for i in (1, 2)]
    big = h.send(7.0, samples=6)
    h.wait_queued(3)
    h.model.gate.set()
    for f in [blocker, *small, big]:
        f.result(timeout=30)
    assert [7.0] * 6 in h.model.batches
    assert sorted(b for batch in h.model.batches if 7.0 not in batch for b in batch) == [-1.0, 1.0, 2.0]
    assert output_array(big.result()).shape == (6, 4, 3, 3)


def test_incompatible_requests_are_not_batched_together(make_harness: object) -> None:
    h = make_harness(max_batch_size=8, max_queue_delay_us=0)  # type: ignore[operator]
    blocker = h.occupy()
    across = [h.send(1.0, mode="across") for _ in range(3)]
    within = [h.send(2.0, mode="within") for _ in range(3)]
    sized = [h.send(3.0, size=3) for _ in range(2)]
    h.wait_queued(8)
    h.model.gate.set()
    for f in [blocker, *across, *within, *sized]:
        f.result(timeout=30)
    assert sorted(sorted(b) for b in h.model.batches[1:]) == [[1.0] * 3, [2.0] * 3, [3.0] * 2]


def test_a_failing_batch_fails_only_its_own_requests(make_harness: object) -> None:
    h = make_harness(max_batch_size=8, max_queue_delay_us=0)  # type: ignore[operator]
    h.model.fail_modes = {"within"}
    blocker = h.occupy()
    good = [h.send(1.0, mode="across") for _ in range(3)]
    bad = [h.send(2.0, mode="within") for _ in range(3)]
    h.wait_queued(6)
    h.model.gate.set()
    blocker.result(timeout=30)
    for f in good:
        assert output_array(f.result(timeout=30)).shape == (1, 4, 3, 3)
    for f in bad:
        with pytest.raises(grpc.RpcError) as info:
            f.result(timeout=30)
        assert info.value.code() == CODE.INTERNAL
    assert [r.failed for r in h.records].count(True) == 1


def test_one_invalid_request_among_good_ones(make_harness: object) -> None:
    """Sent in the same burst: the invalid one is refused at validation and never reaches a batch;
    the good ones are batched and answered. (Failures inside a batch: the next two tests.)"""
    h = make_harness(max_batch_size=16, max_queue_delay_us=50_000)  # type: ignore[operator]
    good = [h.send(float(i)) for i in range(8)]
    bad = h.send(9.0, alpha=-1.0)
    with pytest.raises(grpc.RpcError) as info:
        bad.result(timeout=30)
    assert info.value.code() == CODE.INVALID_ARGUMENT
    for i, f in enumerate(good):
        expected = local_response_norm(torch.full((1, 4, 3, 3), float(i)), 5).numpy()
        np.testing.assert_array_equal(output_array(f.result(timeout=30)), expected)
    assert 9.0 not in [v for b in h.model.batches for v in b]


def test_expired_requests_are_dropped_before_compute(make_harness: object) -> None:
    h = make_harness(max_batch_size=8, max_queue_delay_us=0)  # type: ignore[operator]
    blocker = h.occupy()
    by_parameter = h.send(5.0, timeout=50_000)  # the protocol's own timeout parameter, in µs
    by_deadline = h.send(6.0, deadline=0.2)  # the caller's gRPC deadline
    survivor = h.send(7.0)
    h.wait_queued(3)
    time.sleep(0.4)
    # Failed at their deadlines, while the only instance is still busy: no waiting for a slot.
    assert by_parameter.done() and by_deadline.done() and not survivor.done()
    h.model.gate.set()
    blocker.result(timeout=30)
    survivor.result(timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        by_parameter.result(timeout=30)
    assert info.value.code() == CODE.DEADLINE_EXCEEDED
    assert "deadline passed" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        by_deadline.result(timeout=30)
    assert info.value.code() == CODE.DEADLINE_EXCEEDED
    computed = [v for b in h.model.batches for v in b]
    assert 7.0 in computed and 5.0 not in computed and 6.0 not in computed


def test_cancelled_requests_are_not_computed(make_harness: object) -> None:
    h = make_harness(max_batch_size=8, max_queue_delay_us=0)  # type: ignore[operator]
    blocker = h.occupy()
    call = stub(h.channel).ModelInfer.future(infer_request("lrn", np.full((1, 4, 3, 3), 4.0, np.float32)), timeout=30)
    keep = h.send(3.0)
    h.wait_queued(2)
    assert call.cancel()
    # The server notices the cancellation asynchronously and takes the request out of the queue.
    deadline = time.monotonic() + 10
    while h.batcher.queue_depth > 1:
        assert time.monotonic() < deadline, "server never saw the cancellation"
        time.sleep(0.01)
    h.model.gate.set()
    blocker.result(timeout=30)
    keep.result(timeout=30)
    computed = [v for b in h.model.batches for v in b]
    assert 3.0 in computed and 4.0 not in computed


def test_full_queue_is_resource_exhausted(make_harness: object) -> None:
    h = make_harness(max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)  # type: ignore[operator]
    blocker = h.occupy()
    queued = [h.send(1.0), h.send(2.0)]
    h.wait_queued(2)
    with pytest.raises(grpc.RpcError) as info:
        h.send(3.0).result(timeout=30)
    assert info.value.code() == CODE.RESOURCE_EXHAUSTED
    assert "queue full" in info.value.details()
    h.model.gate.set()
    for f in [blocker, *queued]:
        f.result(timeout=30)


@pytest.mark.parametrize("shape", [(1, 8, 5, 5), (2, 96, 24, 24)], ids=["gathered", "each-in-place"])
def test_each_request_of_a_batch_gets_its_own_parameters_and_samples(make_harness: object, shape: tuple) -> None:
    """Small requests are gathered into one kernel call; large ones (here 3 x 442 KB) are each
    normalized in place from their own bytes. Either way every request gets exactly its answer."""
    h = make_harness(max_batch_size=8, max_queue_delay_us=0)  # type: ignore[operator]
    blocker = h.occupy()
    rng = np.random.default_rng(5)
    cases = [
        (rng.standard_normal(shape).astype(np.float32), {"alpha": 1e-4 * (i + 1), "beta": 0.5 + i / 4, "k": 1.0 + i})
        for i in range(3)
    ]
    futures = [
        h.pool.submit(stub(h.channel).ModelInfer, infer_request("lrn", x, params), timeout=30) for x, params in cases
    ]
    h.wait_queued(3)
    h.model.gate.set()
    blocker.result(timeout=30)  # type: ignore[attr-defined]
    for (x, params), future in zip(cases, futures, strict=True):
        expected = local_response_norm(torch.from_numpy(x), 5, **params).numpy()
        np.testing.assert_array_equal(output_array(future.result(timeout=30)), expected)
    assert [r.samples for r in h.records] == [1, 3 * shape[0]]


def test_recent_concurrency_is_the_peak_of_the_current_or_previous_window() -> None:
    peak = _WindowMax(1.0)
    peak.observe(3, now=0.0)
    peak.observe(7, now=0.5)
    peak.observe(2, now=0.9)
    assert peak.value(0.95) == 7
    peak.observe(1, now=1.2)  # a new window; the previous one's peak still counts
    assert peak.value(1.5) == 7
    assert peak.value(2.3) == 1  # two windows on: only the last one's peak
    assert peak.value(4.0) == 0  # nothing observed for a whole window: no company expected
