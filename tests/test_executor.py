"""The instance layout: how many instances a model runs and how many CPU threads each uses."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from harness import ServerThread, infer_request, output_array, settings, stub

from lrnserve.server.executor import Executor, Work, instance_layout
from lrnserve.server.servables import LRNServable, NetworkServable, create_servable
from lrnserve.server.settings import ModelConfig

CPU = torch.device("cpu")


def test_default_layout_shares_the_cores_among_up_to_four_network_instances() -> None:
    cores = torch.get_num_threads()
    network = create_servable(ModelConfig(name="cifar10_full", kind="cifar10_full"))
    lrn = create_servable(ModelConfig(name="lrn", kind="lrn"))
    assert isinstance(network, NetworkServable) and isinstance(lrn, LRNServable)
    instances = min(cores, 4)
    assert instance_layout(network, CPU, 0, 0) == (instances, max(1, cores // instances))
    assert instance_layout(lrn, CPU, 0, 0) == (1, cores)
    assert instance_layout(network, torch.device("cuda"), 0, 0) == (1, cores)  # one stream
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

    def run(self, group: Hashable, x: torch.Tensor, scalars: Mapping[str, torch.Tensor]) -> torch.Tensor:
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
        assert model.batcher is not None
        executor = model.batcher.executor
        assert (executor.instances, executor.threads) == (2, 1)
        x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
        with running.channel() as channel:
            responses = [
                stub(channel).ModelInfer(infer_request("cifar10_full", x[i : i + 1]), timeout=30) for i in range(3)
            ]
        network = executor.servable.network  # type: ignore[attr-defined]
        with torch.inference_mode():
            expected = network(torch.from_numpy(x)).numpy()
    got = np.concatenate([output_array(r) for r in responses])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
