"""The executor's CUDA path: pooled pinned staging buffers, batch-size buckets, exact float32.

Without a GPU the staged path runs over ordinary memory (``Executor(staged=True)`` on the CPU):
the same gathering, padding to a bucket, pooled buffers and cutting of answers as on CUDA, only
with no stream. The ``cuda`` tests run it for real where a device exists (``make gpu-check``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Hashable, Mapping

import numpy as np
import pytest
import torch
from harness import ServerThread, infer_request, metric_value, output_array, scrape, settings, stub
from test_executor import run_batch

from lrnserve.server import cuda
from lrnserve.server.executor import Executor
from lrnserve.server.ops import local_response_norm
from lrnserve.server.pinned import MIN_CLASS, PinnedPool, size_class
from lrnserve.server.servables import LRNServable, NetworkServable
from lrnserve.server.settings import BatchingPolicy, ModelConfig
from lrnserve.server.work import Work

CPU = torch.device("cpu")
has_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- the pool ----


def test_a_released_buffer_is_reused_for_its_size_class() -> None:
    pool = PinnedPool(1 << 30, pin=False)
    first = pool.lease(100_000)
    first[:] = 7
    del first
    second = pool.lease(120_000)  # the same power-of-two class (128 KiB)
    assert (pool.made, pool.reused) == (1, 1)
    other = pool.lease(300_000)  # a larger class: a new buffer
    assert pool.made == 2 and second.nbytes == 120_000 and other.nbytes == 300_000
    assert size_class(1) == MIN_CLASS and size_class(MIN_CLASS + 1) == 2 * MIN_CLASS


def test_a_buffer_stays_leased_while_any_view_of_it_lives() -> None:
    """An answer's memoryview keeps the batch's output buffer out of the pool until it is sent."""
    pool = PinnedPool(1 << 30, pin=False)
    leased = pool.lease(1000)
    leased[:] = 3
    answer = memoryview(leased)[10:20]  # what a response holds until gRPC has it
    tensor = torch.from_numpy(leased)  # what a copy was made with
    del leased
    assert pool.idle_bytes == 0
    del tensor
    assert pool.idle_bytes == 0
    reused = pool.lease(1000)
    reused[:] = 9
    assert pool.made == 2 and bytes(answer) == b"\x03" * 10  # a new buffer, the answer untouched
    del answer
    assert pool.idle_bytes == MIN_CLASS


def test_the_pool_keeps_at_most_its_limit_and_frees_all_on_close() -> None:
    pool = PinnedPool(2 * MIN_CLASS, pin=False)
    leases = [pool.lease(MIN_CLASS) for _ in range(3)]
    del leases
    assert pool.idle_bytes == 2 * MIN_CLASS  # the third buffer was freed, not kept
    kept = pool.lease(10)
    pool.close()
    assert pool.idle_bytes == 0
    del kept  # a buffer leased when the pool closed is freed with its lease
    assert pool.idle_bytes == 0


# ---- buckets and switches ----


def test_batch_buckets_are_powers_of_two_up_to_the_batch_size() -> None:
    assert cuda.batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert cuda.batch_buckets(12) == (1, 2, 4, 8, 12)
    assert cuda.batch_buckets(1) == (1,)
    buckets = cuda.batch_buckets(12)
    assert [cuda.bucket_for(n, buckets) for n in (1, 3, 5, 9, 12, 13, 40)] == [1, 4, 8, 12, 12, 13, 40]


def test_tf32_stays_off_for_float32_networks_unless_a_model_opts_in(caplog: pytest.LogCaptureFixture) -> None:
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default for cuDNN
        assert "TF32 off" in cuda.configure_network("net", torch.float32, allow_tf32=False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.benchmark
        with caplog.at_level(logging.WARNING, logger="lrnserve.server.cuda"):
            assert "TF32 on" in cuda.configure_network("fast", torch.float32, allow_tf32=True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert "process-wide" in caplog.text and "fast" in caplog.text
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved


# ---- the staged path ----


class CountingNetwork(NetworkServable):
    """cifar10_full, recording each batch's size as the network sees it."""

    def __init__(self) -> None:
        super().__init__(ModelConfig(name="cifar10_full", kind="cifar10_full"))
        self.load(CPU)
        self.batch_buckets = cuda.batch_buckets(8)
        self.seen: list[int] = []

    def run(
        self, group: Hashable, x: torch.Tensor, scalars: Mapping[str, torch.Tensor], abandonment: object = None
    ) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return super().run(group, x, scalars)


def network_work(x: np.ndarray) -> Work:
    return Work(x.view(np.uint8).reshape(-1), x.shape, torch.float32, (), {})


def as_rows(output: object, rows: int) -> np.ndarray:
    assert isinstance(output, (bytes, memoryview)), output
    return np.frombuffer(bytes(output), np.float32).reshape(rows, -1)


def test_staged_batches_are_padded_to_a_bucket_and_reuse_their_buffers() -> None:
    servable = CountingNetwork()
    executor = Executor(servable, CPU, instances=1, threads=1, staged=True)
    rng = np.random.default_rng(3)
    requests = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 2)]
    try:
        first = run_batch(executor, [network_work(x) for x in requests])  # 3 samples: bucket 4
        assert executor.staging is not None
        made = executor.staging.made
        answers = [
            np.frombuffer(bytes(out), np.float32).reshape(len(x), -1)
            for out, x in zip(first.outputs, requests, strict=True)
        ]
        del first
        gc.collect()
        second = run_batch(executor, [network_work(x) for x in requests])
        assert executor.staging.made == made and executor.staging.reused >= 2  # input and output reused
        again = [
            np.frombuffer(bytes(out), np.float32).reshape(len(x), -1)
            for out, x in zip(second.outputs, requests, strict=True)
        ]
    finally:
        executor.close()
    assert servable.seen == [4, 4]
    with torch.inference_mode():
        for x, got, repeated in zip(requests, answers, again, strict=True):
            expected = servable.network(torch.from_numpy(x)).numpy()  # unpadded, straight through torch
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(repeated, got)


# ---- on a GPU (make gpu-check) ----


@has_cuda
@pytest.mark.cuda
def test_a_network_on_cuda_matches_the_cpu_in_float32_and_reuses_pinned_buffers() -> None:
    config = ModelConfig(name="alexnet", kind="alexnet", device="cuda", batching=BatchingPolicy(max_batch_size=8))
    with ServerThread(settings(config)) as running:
        model = running.server.repository.get("alexnet")
        executor, servable = model.executor, model.servable
        assert executor is not None and executor.staging is not None and isinstance(servable, NetworkServable)
        assert servable.batch_buckets == (1, 2, 4, 8) and not torch.backends.cudnn.allow_tf32
        x = np.random.default_rng(0).standard_normal((3, 3, 227, 227)).astype(np.float32)
        with running.channel() as channel:
            got = [output_array(stub(channel).ModelInfer(infer_request("alexnet", x), timeout=60)) for _ in range(3)]
        assert executor.staging.made == 2  # one input and one output buffer, reused by the later batches
        cpu_network = servable.network.to("cpu")
        with torch.inference_mode():
            expected = cpu_network(torch.from_numpy(x)).numpy()
    for answer in got:
        np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-6)


@has_cuda
@pytest.mark.cuda
def test_out_of_device_memory_splits_the_batch() -> None:
    """A memory fraction that fits two LRN samples (input and output) but not eight: the batch is
    split in halves until it fits, and every request is answered exactly."""
    device = torch.device("cuda")
    servable = LRNServable(ModelConfig(name="lrn", kind="lrn", device="cuda"))
    servable.load(device)
    executor = Executor(servable, device, instances=1, threads=1)
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((1, 96, 224, 224)).astype(np.float32) for _ in range(8)]
    work = [
        Work(
            x.view(np.uint8).reshape(-1), x.shape, torch.float32, ("across", 5), {"alpha": 1e-4, "beta": 0.75, "k": 1.0}
        )
        for x in requests
    ]
    sample = requests[0].nbytes
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 6 * sample) / total)
    try:
        result = run_batch(executor, work)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        executor.close()
    for x, out in zip(requests, result.outputs, strict=True):
        expected = local_response_norm(torch.from_numpy(x), 5, 1e-4, 0.75, 1.0).numpy()
        got = as_rows(out, 1).reshape(x.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@has_cuda
@pytest.mark.cuda
def test_the_device_memory_gauge_reports_real_numbers() -> None:
    config = ModelConfig(name="alexnet", kind="alexnet", device="cuda")
    with ServerThread(settings(config)) as running:
        value = metric_value(scrape(running.server.metrics_port), "lrnserve_device_memory_bytes", device="cuda:0")
        assert value is not None and value >= 200e6  # AlexNet's 61 M float32 weights are on the device
