"""Work that computes off the event loop without leaving threads behind (``in_own_thread``).

Model loads compute with torch (warm-ups, trial runs); OpenMP keeps a team of worker threads for
every thread that ran a parallel region, for as long as that thread lives. A team left on a
reused pool thread outnumbers the cores and makes OpenMP stop spinning its idle workers, which
slows every instance's parallel ops; these tests check that loads leave nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import torch
from harness import ServerThread, settings, wait_until

from lrnserve.server.eventloop import in_own_thread
from lrnserve.server.servables import Servable, create_servable
from lrnserve.server.settings import ModelConfig

TASKS = Path("/proc/self/task")
pytestmark = pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through /proc/self/task (Linux)")


def os_threads() -> set[int]:
    """The ids of this process's OS threads."""
    return {int(tid) for tid in os.listdir(TASKS)}


def parallel_work() -> tuple[set[int], int]:
    """A torch op big enough to run in parallel on two threads; the OS threads alive meanwhile,
    and this thread's own id."""
    torch.set_num_threads(2)
    torch.nn.functional.avg_pool2d(torch.ones(16, 64, 64, 64), 3)
    return os_threads(), threading.get_native_id()


def join_named(name: str) -> None:
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{name} still running"


def test_result_and_error_come_back() -> None:
    async def main() -> tuple[int, str]:
        value = await in_own_thread(lambda: 41 + 1, "test-value")
        with pytest.raises(ValueError, match="bad weights") as raised:
            await in_own_thread(lambda: (_ for _ in ()).throw(ValueError("bad weights")), "test-error")
        return value, str(raised.value)

    assert asyncio.run(main()) == (42, "bad weights")


def test_the_thread_and_its_openmp_team_are_gone_afterwards() -> None:
    # Threads are told apart by id: other tests' threads may start or end meanwhile.
    torch.set_num_threads(torch.get_num_threads())  # torch's first call of it starts a thread of its own

    async def main() -> tuple[set[int], set[int]]:
        before = os_threads()
        during, worker = await in_own_thread(parallel_work, "test-load")
        join_named("test-load")
        team = during - before - {worker}
        assert team, "the work did not run in parallel: nothing to check"
        # The team's workers end once their master has (OpenMP does not join them): wait for it.
        wait_until(lambda: not team & os_threads(), "the load thread's OpenMP workers ending")
        # What a pool thread does instead (the reason for in_own_thread): its team stays.
        before = os_threads()
        during, worker = await asyncio.to_thread(parallel_work)
        pooled_team = during - before - {worker}
        return pooled_team, os_threads()

    pooled_team, after = asyncio.run(main())
    assert pooled_team and pooled_team & after, "a pool thread's team should have stayed"


class Recording:
    """The server's own servables, each remembering the thread its load ran on."""

    def __init__(self) -> None:
        self.loaded_on: dict[str, str] = {}

    def __call__(self, config: ModelConfig) -> Servable:
        servable = create_servable(config)
        load = servable.load

        def recorded(device: torch.device) -> str:
            self.loaded_on[config.name] = threading.current_thread().name
            return load(device)

        servable.load = recorded  # type: ignore[method-assign]
        return servable


def test_the_server_loads_models_on_threads_that_end() -> None:
    factory = Recording()
    configs = [
        ModelConfig(name="cifar", kind="cifar10_full", instances=1, threads=2),
        ModelConfig(name="lrn", kind="lrn"),
    ]
    with ServerThread(settings(*configs), servables=factory):
        assert factory.loaded_on == {"cifar": "lrnserve-load-cifar", "lrn": "lrnserve-load-lrn"}
        for name in factory.loaded_on.values():
            join_named(name)
