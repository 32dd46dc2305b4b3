"""Limits and backpressure: refused before allocation, out-of-memory isolated, dead clients dropped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from harness import (
    GatedLRN,
    Probes,
    ServerThread,
    gated_server,
    infer_request,
    join_all,
    lrn_model,
    output_array,
    settings,
    stub,
    wait_until,
)

from lrnserve.client import Client, ResourceExhausted
from lrnserve.server.ops import local_response_norm
from lrnserve.server.servables import Resolved


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[ServerThread, Probes]]:
    config = replace(
        settings(lrn_model("lrn", max_request_samples=8)),
        max_tensor_elements=100_000,
        max_tensor_bytes=300_000,
        max_inflight_bytes=1_100_000,  # four 60 kB requests (240 kB held each), and a 262 kB one
    )
    running, probes = gated_server(config)
    with running:
        yield running, probes


@pytest.fixture(scope="module")
def server(gated: tuple[ServerThread, Probes]) -> ServerThread:
    return gated[0]


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


def test_inflight_byte_budget(gated: tuple[ServerThread, Probes]) -> None:
    server, probes = gated
    model = probes["lrn"]
    # Each request holds its message from receipt and three times its output (60 kB): 240 kB,
    # so four fit in the 1.1 MB budget and a fifth's message is refused on receipt.
    x = np.ones((1, 1, 150, 100), np.float32)
    each = len(infer_request("lrn", x).SerializeToString()) + 3 * x.nbytes
    assert 4 * each <= server.server.settings.max_inflight_bytes < 5 * each
    model.started.clear()
    model.gate.clear()
    try:
        with server.channel() as channel:
            held = [stub(channel).ModelInfer.future(infer_request("lrn", x), timeout=30) for _ in range(4)]
            assert model.started.wait(10), "no held request started computing"
            wait_until(lambda: server.server.dataplane.inflight_bytes == 4 * each, "4 requests in flight")
            with pytest.raises(grpc.RpcError) as info:
                stub(channel).ModelInfer(infer_request("lrn", x), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy" in info.value.details()
            model.gate.set()
            expected = local_response_norm(torch.from_numpy(x), 5).numpy()
            for call in held:
                np.testing.assert_array_equal(output_array(call.result(timeout=30)), expected)
    finally:
        model.gate.set()
    # Given back when each call's task ends, just after its answer went out.
    wait_until(lambda: server.server.dataplane.inflight_bytes == 0, "the byte budget given back")


class TightMemory(GatedLRN):
    """Runs out of memory on batches above ``fits`` samples, and on any sample filled with 13.

    The checks sit in ``_enter``, which both compute paths (``run`` and the native ``run_raw``)
    go through, so the split is tested whichever path this machine's CPU takes."""

    fits = 2

    def _enter(self, group: object, first_values: list[float]) -> None:
        super()._enter(group, first_values)  # the gate, and the record of every attempt
        if len(first_values) > self.fits:
            raise MemoryError(f"{len(first_values)} samples do not fit")
        if 13.0 in first_values:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def test_out_of_memory_splits_the_batch_and_fails_only_what_cannot_fit() -> None:
    running, probes = gated_server(settings(lrn_model("lrn", max_batch_size=8)), probe=TightMemory)
    with running:
        tight = probes["lrn"]
        batcher = running.server.repository.get("lrn").batcher
        assert batcher is not None
        tight.gate.clear()
        results: dict[int, object] = {}
        try:
            with Client(running.target, timeout=30, retries=0) as client:

                def send(i: int) -> None:
                    x = np.full((1, 4, 3, 3), 13.0 if i == 5 else float(i), np.float32)
                    try:
                        results[i] = client.lrn(x)
                    except Exception as exc:  # checked below, in the test's thread
                        results[i] = exc

                blocker = threading.Thread(target=send, args=(-1,))
                blocker.start()
                assert tight.started.wait(10), "the blocker never started computing"
                senders = [threading.Thread(target=send, args=(i,)) for i in range(8)]
                for t in senders:
                    t.start()
                wait_until(lambda: batcher.queue_depth == 8, "8 requests queued behind the blocker")
                tight.gate.set()
                join_all([blocker, *senders], timeout=60)
        finally:
            tight.gate.set()
        assert sorted(results) == list(range(-1, 8))
        assert isinstance(results[5], ResourceExhausted), results[5]
        assert "out of cpu memory" in str(results[5])
        for i in (-1, 0, 1, 2, 3, 4, 6, 7):
            expected = local_response_norm(torch.full((1, 4, 3, 3), float(i)), 5).numpy()
            np.testing.assert_array_equal(results[i], expected, err_msg=f"request {i}")  # type: ignore[arg-type]
        # The 8 queued requests really were tried as one batch first, then in halves.
        queued = [batch for batch in tight.batches if -1.0 not in batch]  # all but the blocker's
        assert len(queued[0]) == 8, tight.batches
        computed = [batch for batch in queued if len(batch) <= TightMemory.fits and 13.0 not in batch]
        assert sorted({v for batch in computed for v in batch}) == [0, 1, 2, 3, 4, 6, 7], tight.batches


def test_a_disconnected_clients_queued_request_is_dropped() -> None:
    running, probes = gated_server(settings(lrn_model("lrn", max_batch_size=8)))
    with running:
        gated = probes["lrn"]
        batcher = running.server.repository.get("lrn").batcher
        assert batcher is not None
        gated.gate.clear()
        keep = running.channel()
        leaving = running.channel()
        try:
            blocker = stub(keep).ModelInfer.future(
                infer_request("lrn", np.full((1, 4, 3, 3), -1.0, np.float32)), timeout=30
            )
            assert gated.started.wait(10), "the blocker never started computing"
            gone = stub(leaving).ModelInfer.future(
                infer_request("lrn", np.full((1, 4, 3, 3), 4.0, np.float32)), timeout=30
            )  # keep the reference: dropping it would cancel the call, not disconnect
            wait_until(lambda: batcher.queue_depth == 1, "the leaving client's request queued")
            leaving.close()  # the client goes away with its request still queued
            wait_until(lambda: batcher.queue_depth == 0, "the server noticed the client left")
            gated.gate.set()
            blocker.result(timeout=30)
        finally:
            gated.gate.set()
            keep.close()
            leaving.close()
        assert gone.done()
        assert gated.batches and all(batch == [-1.0] for batch in gated.batches)  # the leaver's never ran
