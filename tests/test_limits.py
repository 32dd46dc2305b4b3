"""Limits and backpressure: refused before allocation, out-of-memory isolated, dead clients dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from harness import ServerThread, gate_model, infer_request, lrn_model, output_array, settings, stub

from lrnserve.client import Client, ResourceExhausted
from lrnserve.server.ops import local_response_norm
from lrnserve.server.servables import LRNServable, Resolved


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = replace(
        settings(lrn_model("lrn", max_request_samples=8)),
        max_tensor_elements=100_000,
        max_tensor_bytes=300_000,
        max_inflight_bytes=1_000_000,
    )
    with ServerThread(config) as running:
        yield running


def code_and_details(server: ServerThread, request: object) -> tuple[grpc.StatusCode, str]:
    with server.channel() as channel:
        try:
            stub(channel).ModelInfer(request, timeout=30)  # type: ignore[arg-type]
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def with_shape(shape: list[int]) -> object:
    request = infer_request("lrn", np.ones((1, 1, 1, 1), np.float32))
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)
    return request


@pytest.mark.parametrize(
    ("shape", "code", "fragment"),
    [
        ([1, 1, 1000, 1000], grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit of 100000"),
        ([2**10, 2**10, 2**10, 2**10], grpc.StatusCode.RESOURCE_EXHAUSTED, "elements"),
        ([2**40, 2**40, 2**40, 1], grpc.StatusCode.INVALID_ARGUMENT, "more than 2^63 elements"),
        ([9, 1, 2, 2], grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),  # data checked after limits
        ([1, 0, 2, 2], grpc.StatusCode.INVALID_ARGUMENT, ">= 1"),
    ],
)
def test_claimed_shapes_are_refused_before_allocation(
    server: ServerThread, shape: list[int], code: grpc.StatusCode, fragment: str
) -> None:
    got, details = code_and_details(server, with_shape(shape))
    assert got == code, details
    assert fragment in details


def test_windows_too_costly_for_the_tensor(server: ServerThread) -> None:
    # size 4096 on a [1,1,256,256] plane: windows clip to 2*256-1 rows and columns -> 6.7e7 sums: fine.
    code, _ = code_and_details(
        server, infer_request("lrn", np.ones((1, 1, 256, 256), np.float32), {"size": 4096, "mode": "within"})
    )
    assert code == grpc.StatusCode.OK
    servable = server.server.repository.get("lrn").servable
    assert servable is not None
    huge = servable.check_cost((64, 1, 4096, 4096), Resolved(("within", 4096), {}))
    assert huge is not None and "parameters.size" in huge and "additions" in huge
    assert servable.check_cost((32, 96, 55, 55), Resolved(("across", 5), {})) is None


def test_per_tensor_bytes_and_samples(server: ServerThread) -> None:
    code, details = code_and_details(server, infer_request("lrn", np.ones((1, 1, 300, 300), np.float64)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit per tensor" in details  # 720 kB > 300 kB
    code, details = code_and_details(server, infer_request("lrn", np.ones((9, 1, 2, 2), np.float32)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "9 samples" in details and "limit of 8" in details
    code, _ = code_and_details(server, infer_request("lrn", np.ones((8, 1, 2, 2), np.float32)))
    assert code == grpc.StatusCode.OK


def test_inflight_byte_budget(server: ServerThread) -> None:
    gated = gate_model(server)
    gated.gate.clear()
    x = np.ones((1, 1, 250, 250), np.float32)  # 250 kB each; the budget is 1 MB
    with server.channel() as channel:
        held = [stub(channel).ModelInfer.future(infer_request("lrn", x), timeout=30) for _ in range(4)]
        deadline = time.monotonic() + 10
        while server.server.dataplane.inflight_bytes < 4 * x.nbytes:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            stub(channel).ModelInfer(infer_request("lrn", x), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in info.value.details()
        gated.gate.set()
        for call in held:
            assert output_array(call.result(timeout=30)).shape == x.shape
    assert server.server.dataplane.inflight_bytes == 0
    model = server.server.repository.get("lrn")
    model.batcher.executor.servable = LRNServable(model.config)  # type: ignore[union-attr]


class TightMemory(LRNServable):
    """Runs out of memory on batches above ``fits`` samples, and on any sample filled with 13."""

    fits = 2

    def run(self, group: object, x: torch.Tensor, scalars: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if x.shape[0] > self.fits:
            raise MemoryError(f"{x.shape[0]} samples do not fit")
        if any(bool((sample == 13).all()) for sample in x):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return super().run(group, x, scalars)  # type: ignore[arg-type]


def test_out_of_memory_splits_the_batch_and_fails_only_what_cannot_fit() -> None:
    with ServerThread(settings(lrn_model("lrn", max_batch_size=8))) as running:
        gated = gate_model(running)
        model = running.server.repository.get("lrn")
        gated.gate.clear()
        with Client(running.target, timeout=30, retries=0) as client:
            blocker = threading.Thread(target=client.lrn, args=(np.ones((1, 4, 3, 3), np.float32),))
            blocker.start()
            assert gated.started.wait(10)
            model.batcher.executor.servable = TightMemory(model.config)  # type: ignore[union-attr]
            results: dict[int, object] = {}

            def send(i: int) -> None:
                x = np.full((1, 4, 3, 3), 13.0 if i == 5 else float(i), np.float32)
                try:
                    results[i] = client.lrn(x)
                except ResourceExhausted as exc:
                    results[i] = exc

            senders = [threading.Thread(target=send, args=(i,)) for i in range(8)]
            for t in senders:
                t.start()
            deadline = time.monotonic() + 10
            while model.batcher.queue_depth < 8:  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            gated.gate.set()
            for t in [blocker, *senders]:
                t.join(timeout=30)
        assert isinstance(results[5], ResourceExhausted) and "out of cpu memory" in str(results[5])
        for i in (0, 1, 2, 3, 4, 6, 7):
            expected = local_response_norm(torch.full((1, 4, 3, 3), float(i)), 5).numpy()
            np.testing.assert_array_equal(results[i], expected)  # type: ignore[arg-type]


def test_a_disconnected_clients_queued_request_is_dropped() -> None:
    with ServerThread(settings(lrn_model("lrn", max_batch_size=8))) as running:
        gated = gate_model(running)
        gated.gate.clear()
        keep = running.channel()
        blocker = stub(keep).ModelInfer.future(
            infer_request("lrn", np.full((1, 4, 3, 3), -1.0, np.float32)), timeout=30
        )
        assert gated.started.wait(10)
        leaving = running.channel()
        gone = stub(leaving).ModelInfer.future(
            infer_request("lrn", np.full((1, 4, 3, 3), 4.0, np.float32)), timeout=30
        )  # keep the reference: dropping it would cancel the call, not disconnect
        batcher = running.server.repository.get("lrn").batcher
        deadline = time.monotonic() + 10
        while batcher.queue_depth < 1:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        leaving.close()  # the client goes away with its request still queued
        deadline = time.monotonic() + 10
        while batcher.queue_depth > 0:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the server never noticed the client left"
            time.sleep(0.01)
        gated.gate.set()
        blocker.result(timeout=30)
        keep.close()
        assert gone.done()
        assert 4.0 not in [v for batch in gated.batches for v in batch]
