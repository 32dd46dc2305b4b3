"""The executor: the instance layout (how many instances a model runs and how many CPU threads
each uses), and how it splits a batch, or one request, that runs out of memory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pytest
import torch
from harness import ServerThread, infer_request, output_array, settings, stub

from lrnserve.server.errors import ResourceExhausted
from lrnserve.server.executor import Executor, instance_layout
from lrnserve.server.ops import local_response_norm, native
from lrnserve.server.servables import LRNServable, NetworkServable, create_servable
from lrnserve.server.settings import ModelConfig
from lrnserve.server.work import Abandonment, BatchAbandoned, BatchResult, Work

CPU = torch.device("cpu")


def test_default_layout_shares_the_cores_among_up_to_four_network_instances() -> None:
    cores = torch.get_num_threads()
    network = create_servable(ModelConfig(name="cifar10_full", kind="cifar10_full"))
    lrn = create_servable(ModelConfig(name="lrn", kind="lrn"))
    assert isinstance(network, NetworkServable) and isinstance(lrn, LRNServable)
    instances = min(cores, 4)
    assert instance_layout(network, CPU, 0, 0) == (instances, max(1, cores // instances))
    assert instance_layout(lrn, CPU, 0, 0) == (1, cores)
    assert instance_layout(network, torch.device("cuda"), 0, 0) == (2, max(1, cores // 2))  # two streams
    assert instance_layout(lrn, torch.device("cuda"), 0, 0) == (2, max(1, cores // 2))
    assert network.default_cpu_instances(2) == 2 and network.default_cpu_instances(64) == 4
    assert network.default_cpu_instances(1) == 1
    assert instance_layout(network, CPU, 3, 2) == (3, 2)  # as configured
    assert instance_layout(lrn, CPU, 2, 0) == (2, max(1, cores // 2))
    assert instance_layout(lrn, CPU, cores + 5, 0) == (cores + 5, 1)  # at least one thread each


class Recording(LRNServable):
    """Records, per batch, the instance thread and the intra-op threads torch uses there;
    every batch waits until ``together`` batches run at once."""

    def __init__(self, together: int) -> None:
        super().__init__(ModelConfig(name="lrn", kind="lrn"))
        self.load(CPU)
        self.meeting = threading.Barrier(together, timeout=20)
        self.seen: list[tuple[str, int]] = []

    def run(
        self, group: Hashable, x: torch.Tensor, scalars: Mapping[str, torch.Tensor], abandonment: object = None
    ) -> torch.Tensor:
        self.seen.append((threading.current_thread().name, torch.get_num_threads()))
        self.meeting.wait()  # BrokenBarrierError unless the instances really run side by side
        return super().run(group, x, scalars)

    def run_raw(self, *args: object, **kwargs: object) -> None:
        return None  # take the torch path, where torch's thread count matters


def test_instances_run_side_by_side_each_with_its_own_thread_count() -> None:
    servable = Recording(together=2)
    before = torch.get_num_threads()
    executor = Executor(servable, CPU, instances=2, threads=1)

    async def two_batches() -> list[object]:
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[object]] = [loop.create_future() for _ in range(2)]
        for i, future in enumerate(results):
            x = np.full((1, 4, 3, 3), float(i + 1), np.float32)
            work = Work(
                x.view(np.uint8).reshape(-1),
                x.shape,
                torch.float32,
                ("across", 5),
                {"alpha": 1e-4, "beta": 0.75, "k": 1.0},
            )
            executor.submit([work], future.set_result)
        return list(await asyncio.wait_for(asyncio.gather(*results), timeout=30))

    try:
        results = asyncio.run(two_batches())
    finally:
        executor.close()
    assert not any(isinstance(r, BaseException) for r in results), results
    assert sorted(name for name, _ in servable.seen) == ["lrnserve-lrn_0", "lrnserve-lrn_1"]
    assert [threads for _, threads in servable.seen] == [1, 1]
    assert torch.get_num_threads() == before  # the caller's own pool is untouched
    assert servable.threads == 1  # what the fused kernel is told, too


def test_a_served_network_runs_its_layout_and_answers_correctly() -> None:
    config = ModelConfig(name="cifar10_full", kind="cifar10_full", instances=2, threads=1)
    with ServerThread(settings(config)) as running:
        model = running.server.repository.get("cifar10_full")
        executor, servable = model.executor, model.servable
        assert executor is not None and isinstance(servable, NetworkServable)
        assert (executor.instances, executor.threads) == (2, 1)
        assert servable.threads == 1  # what the executor told the servable it serves
        x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
        with running.channel() as channel:
            responses = [
                stub(channel).ModelInfer(infer_request("cifar10_full", x[i : i + 1]), timeout=30) for i in range(3)
            ]
        with torch.inference_mode():
            expected = servable.network(torch.from_numpy(x)).numpy()
    got = np.concatenate([output_array(r) for r in responses])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ---- out of memory: a batch in halves, one request in halves, down to one sample ----


def lrn_work(x: np.ndarray, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Work:
    return Work(
        x.view(np.uint8).reshape(-1), x.shape, torch.float32, ("across", 5), {"alpha": alpha, "beta": beta, "k": k}
    )


def run_batch(executor: Executor, items: Sequence[Work]) -> BatchResult:
    """``items`` as one batch through ``executor``, as the batcher submits it."""

    async def submit() -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        executor.submit(items, future.set_result)
        return await asyncio.wait_for(future, timeout=30)

    result = asyncio.run(submit())
    assert isinstance(result, BatchResult), result
    return result


def as_array(output: object, shape: tuple[int, ...]) -> np.ndarray:
    assert isinstance(output, (bytes, memoryview)), output
    return np.frombuffer(bytes(output), np.float32).reshape(shape)


class WhereComputed(LRNServable):
    """The LRN op, recording the thread that computes each batch; ``raw``: whether it has the
    torch-free path (the fused kernel) at all."""

    def __init__(self, raw: bool = True) -> None:
        super().__init__(ModelConfig(name="lrn", kind="lrn"))
        self.load(CPU)
        self.raw = raw
        self.threads_seen: list[str] = []

    def run(
        self, group: Hashable, x: torch.Tensor, scalars: Mapping[str, torch.Tensor], abandonment: object = None
    ) -> torch.Tensor:
        self.threads_seen.append(threading.current_thread().name)
        return super().run(group, x, scalars)

    def run_raw(
        self,
        group: Hashable,
        parts: Sequence[np.ndarray],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        scalars: Mapping[str, np.ndarray],
    ) -> np.ndarray | None:
        if not self.raw:
            return None
        self.threads_seen.append(threading.current_thread().name)
        return super().run_raw(group, parts, shape, dtype, scalars)


@pytest.mark.parametrize(
    ("requests", "shape", "size", "raw", "where"),
    [
        (3, (1, 16, 8, 8), 5, True, "event loop"),  # 3072 elements: computed where submitted
        (16, (1, 16, 8, 8), 5, True, "event loop"),  # 16384, the limit
        (4, (1, 16, 8, 8), 9, True, "event loop"),  # 9 window additions per element
        (1, (1, 16, 8, 8), 5, True, "instance"),  # a lone request: to the instance
        (17, (1, 16, 8, 8), 5, True, "instance"),  # past the limit
        (2, (1, 96, 13, 13), 5, True, "instance"),  # 32448 elements: the kernel would run in parallel
        (2, (1, 1024, 2, 2), 1024, True, "instance"),  # few elements, but 1024 additions each
        (3, (1, 16, 8, 8), 5, False, "instance"),  # no torch-free path: torch runs on the instance
    ],
)
def test_small_batches_compute_on_the_event_loop_others_on_an_instance(
    requests: int, shape: tuple[int, ...], size: int, raw: bool, where: str
) -> None:
    if raw and native.kernel() is None:
        pytest.skip("the fused kernel did not build here")
    servable = WhereComputed(raw)
    executor = Executor(servable, CPU, instances=1, threads=2)
    rng = np.random.default_rng(requests)
    xs = [(rng.standard_normal(shape) * 4).astype(np.float32) for _ in range(requests)]
    alphas = [1e-4 * (i + 1) for i in range(requests)]
    items = []
    for x, alpha in zip(xs, alphas, strict=True):
        scalars = {"alpha": alpha, "beta": 0.75, "k": 1.0}
        items.append(Work(x.view(np.uint8).reshape(-1), x.shape, torch.float32, ("across", size), scalars))
    try:
        result = run_batch(executor, items)
    finally:
        executor.close()
    expected_thread = threading.main_thread().name if where == "event loop" else "lrnserve-lrn_0"
    assert servable.threads_seen == [expected_thread]
    for output, x, alpha in zip(result.outputs, xs, alphas, strict=True):
        expected = local_response_norm(torch.from_numpy(x), size, alpha, 0.75, 1.0).numpy()
        np.testing.assert_allclose(as_array(output, x.shape), expected, rtol=1e-6, atol=1e-7)


class TightMemory(LRNServable):
    """The LRN op, out of memory for batches above ``fits`` samples and for any sample filled
    with 13 (as torch's CPU allocator says it); records each attempt's sample count. Both compute
    paths check, so the split is tested whichever one this CPU takes."""

    def __init__(self, fits: int) -> None:
        super().__init__(ModelConfig(name="lrn", kind="lrn"))
        self.load(CPU)
        self.fits = fits
        self.attempts: list[int] = []

    def _check(self, samples: np.ndarray) -> None:
        self.attempts.append(len(samples))
        if len(samples) > self.fits:
            raise MemoryError(f"{len(samples)} samples do not fit")
        if any(bool((sample == 13).all()) for sample in samples):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    def run(
        self, group: Hashable, x: torch.Tensor, scalars: Mapping[str, torch.Tensor], abandonment: object = None
    ) -> torch.Tensor:
        self._check(x.reshape(x.shape[0], -1).numpy())
        return super().run(group, x, scalars)

    def run_raw(
        self,
        group: Hashable,
        parts: Sequence[np.ndarray],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        scalars: Mapping[str, np.ndarray],
    ) -> np.ndarray | None:
        if self._kernel is None:
            return None  # run() checks
        self._check(np.concatenate(parts).view(np.float32).reshape(shape[0], -1))
        return super().run_raw(group, parts, shape, dtype, scalars)


def test_out_of_memory_splits_one_request_and_joins_its_halves() -> None:
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 5, 3, 4)) * 3).astype(np.float32)
    other = (rng.standard_normal((1, 5, 3, 4)) * 3).astype(np.float32)
    servable = TightMemory(fits=2)
    executor = Executor(servable, CPU, instances=1, threads=1)
    try:
        result = run_batch(executor, [lrn_work(x, 0.5, 0.75, 2.0), lrn_work(other, 1.5, 0.6, 1.0)])
    finally:
        executor.close()
    # 7 samples fail; the first request alone (6) fails, so it is cut in halves of 3, each of
    # which fails and is cut into 1 + 2; then the second request alone.
    assert servable.attempts == [7, 6, 3, 1, 2, 3, 1, 2, 1]
    first, second = result.outputs
    expected = local_response_norm(torch.from_numpy(x), 5, 0.5, 0.75, 2.0).numpy()
    np.testing.assert_array_equal(as_array(first, x.shape), expected)  # the joined halves: the unsplit answer
    expected_other = local_response_norm(torch.from_numpy(other), 5, 1.5, 0.6, 1.0).numpy()
    np.testing.assert_array_equal(as_array(second, other.shape), expected_other)


def test_a_sample_that_never_fits_fails_its_request_alone() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    x[2] = 13.0
    other = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    servable = TightMemory(fits=8)
    executor = Executor(servable, CPU, instances=1, threads=1)
    try:
        failing, fine = run_batch(executor, [lrn_work(x), lrn_work(other)]).outputs
    finally:
        executor.close()
    # 5 fail (13 inside); each request alone; the first in halves 2 + 2, the second half in 1 + 1.
    assert servable.attempts == [5, 4, 2, 2, 1, 1, 1]
    assert isinstance(failing, ResourceExhausted), failing
    assert failing.message == "model 'lrn': out of cpu memory for one sample of shape [3, 2, 2]"
    np.testing.assert_array_equal(as_array(fine, other.shape), local_response_norm(torch.from_numpy(other), 5).numpy())


JOIN_FAILS = textwrap.dedent(
    """
    import asyncio

    import numpy as np
    import torch

    from lrnserve.server.errors import ServingError
    from lrnserve.server.executor import Executor
    from lrnserve.server.servables import LRNServable
    from lrnserve.server.settings import ModelConfig
    from lrnserve.server.work import Abandonment, BatchAbandoned, BatchResult, Work, Work

    HALF = 2**61  # bytes each half's output claims: joined, 2**62, more than any allocator gives


    class HugeHalves(LRNServable):
        # Out of memory above one sample; one sample's output claims HALF bytes. The claim is a
        # view far past its one real byte: only lengths are taken of it, never its bytes, since
        # the join's allocation fails before anything is copied.
        computed = 0

        def run_raw(self, group, parts, shape, dtype, scalars):
            if shape[0] > 1:
                raise MemoryError(f"{shape[0]} samples do not fit")
            HugeHalves.computed += 1
            return np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (HALF,), (1,), writeable=False)

        def run(self, group, x, scalars, abandonment=None):
            raise AssertionError("run_raw answers every batch here")


    x = np.ones((2, 1, 1, 1), np.float32)
    scalars = {"alpha": 1e-4, "beta": 0.75, "k": 1.0}
    work = Work(x.view(np.uint8).reshape(-1), x.shape, torch.float32, ("across", 5), scalars)
    executor = Executor(HugeHalves(ModelConfig(name="lrn", kind="lrn")), torch.device("cpu"), instances=1, threads=1)


    async def main():
        future = asyncio.get_running_loop().create_future()
        executor.submit([work], future.set_result)
        return await asyncio.wait_for(future, timeout=30)


    result = asyncio.run(main())
    executor.close()
    assert isinstance(result, BatchResult), repr(result)
    (output,) = result.outputs
    assert isinstance(output, ServingError), type(output)
    print(HugeHalves.computed, output.code.name, output.message)
    """
)


def test_out_of_memory_joining_a_split_requests_output_fails_that_request() -> None:
    # Both halves computed, but their output cannot be joined: a real MemoryError from the
    # executor's own join (2**62 bytes asked of the allocator). In a child process, so that the
    # over-long views its servable hands back stay out of the test process.
    result = subprocess.run([sys.executable, "-c", JOIN_FAILS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "2 RESOURCE_EXHAUSTED model 'lrn': out of memory joining the output"


# ---- batches nobody waits for ----


def test_an_abandoned_batch_is_not_computed() -> None:
    class Counting(LRNServable):
        computed = 0

        def run_raw(self, *args: object, **kwargs: object) -> None:
            Counting.computed += 1
            return None

    servable = Counting(ModelConfig(name="lrn", kind="lrn"))
    servable.load(CPU)
    executor = Executor(servable, CPU, instances=1, threads=1)
    x = np.ones((1, 4, 3, 3), np.float32)
    scalars = {"alpha": 1e-4, "beta": 0.75, "k": 1.0}
    work = Work(x.view(np.uint8).reshape(-1), x.shape, torch.float32, ("across", 5), scalars)

    async def one(abandoned: bool) -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        abandonment = Abandonment()
        abandonment.abandoned = abandoned
        executor.submit([work], future.set_result, abandonment)
        return await asyncio.wait_for(future, timeout=30)

    try:
        assert isinstance(asyncio.run(one(abandoned=True)), BatchAbandoned)
        assert Counting.computed == 0
        assert not isinstance(asyncio.run(one(abandoned=False)), BaseException)
        assert Counting.computed == 1
    finally:
        executor.close()


def test_a_network_stops_between_stages_once_its_batch_is_abandoned() -> None:
    servable = create_servable(ModelConfig(name="cifar10_full", kind="cifar10_full"))
    assert isinstance(servable, NetworkServable)
    servable.load(CPU)
    servable.chain = None  # stage by stage (a small batch would otherwise be one native call)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        np.testing.assert_array_equal(servable.run((), x, {}, Abandonment()).numpy(), servable.network(x).numpy())

    abandonment = Abandonment()
    layers = list(servable.network.features.children())
    ran_after: list[str] = []
    first = layers[0].register_forward_hook(lambda *_: setattr(abandonment, "abandoned", True))
    later = [
        layer.register_forward_hook(lambda module, *_: ran_after.append(type(module).__name__)) for layer in layers[1:]
    ]
    head = servable.network.classifier.register_forward_hook(lambda *_: ran_after.append("classifier"))
    try:
        with torch.inference_mode(), pytest.raises(BatchAbandoned):
            servable.run((), x, {}, abandonment)
    finally:
        for hook in (first, *later, head):
            hook.remove()
    assert ran_after == [], f"stages ran after the batch was abandoned: {ran_after}"
