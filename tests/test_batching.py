"""Dynamic batching, deterministically: the batcher on its own, driven by a fake runner.

Each test builds a ``Batcher`` on a fresh event loop with a ``FakeRunner`` that records every
batch it is handed and computes nothing until the test releases it, and an observer that
records what the batcher reports. Requests are told apart by the constant their tensor is
filled with. The tests synchronise on the event loop itself (``until`` yields to it a bounded
number of times), never on sleeps; where time matters, a delay is either so long that it
cannot pass during the test, or only a lower bound is asserted.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import grpc
import numpy as np
import pytest
import torch

from lrnserve.server import batching
from lrnserve.server.batching import Batcher, InternalError, _WindowMax
from lrnserve.server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ServingError, Unavailable
from lrnserve.server.executor import Executor
from lrnserve.server.ops import local_response_norm
from lrnserve.server.servables import LRNServable
from lrnserve.server.settings import BatchingPolicy, ModelConfig
from lrnserve.server.work import Abandonment, BatchAbandoned, BatchRecord, BatchResult, Done, Output, Work

P = ParamSpec("P")
T = TypeVar("T")
CODE = grpc.StatusCode
SAMPLE_SHAPE = (4, 3, 3)
DEFAULT_SCALARS = {"alpha": 1e-4, "beta": 0.75, "k": 1.0}
ROUNDS = 100  # loop iterations any hand-off here needs, with a wide margin (each needs a few)


# ---- running on an event loop ----


def on_loop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test on a fresh event loop; fail it if any callback raised (an exception
    escaping the batcher's callbacks only reaches the loop's exception handler)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async def main() -> None:
            escaped: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _loop, context: escaped.append(context))
            await test(*args, **kwargs)
            await settle()
            assert not escaped, f"exceptions escaped to the event loop: {escaped}"

        asyncio.run(main())

    return run


async def settle(rounds: int = 20) -> None:
    """Let the loop run ``rounds`` iterations (every callback already scheduled, and those it
    schedules in turn, up to that depth)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], what: str = "condition", rounds: int = ROUNDS) -> None:
    """Yield to the loop until ``condition`` holds; fail if it does not within ``rounds`` iterations."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition(), f"{what} never held in {rounds} loop iterations"


async def settled(task: asyncio.Task[T]) -> T:
    """``task``'s result (or exception), once it has finished within a bounded number of iterations."""
    await until(task.done, "the request finished")
    return task.result()


@pytest.fixture(autouse=True)
def long_concurrency_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batcher forgets how many requests it held at once after a second or so of wall time;
    here it remembers for an hour, so that a descheduled test machine cannot change whether a
    batch waits for company."""
    monkeypatch.setattr(batching, "PEAK_WINDOW_SECONDS", 3600.0)


# ---- requests ----


def work(
    value: float,
    samples: int = 1,
    mode: str = "across",
    size: int = 5,
    sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
    dtype: torch.dtype = torch.float32,
    **scalars: float,
) -> Work:
    """A request whose every element is ``value``."""
    x = np.full((samples, *sample_shape), value, np.float64 if dtype == torch.float64 else np.float32)
    return Work(x.view(np.uint8).reshape(-1), x.shape, dtype, (mode, size), {**DEFAULT_SCALARS, **scalars})


def values(items: Sequence[Work]) -> list[float]:
    """The fill value of each sample of a batch."""
    out: list[float] = []
    for w in items:
        x = np.frombuffer(w.payload, np.float64 if w.dtype == torch.float64 else np.float32)
        out += [float(sample[0]) for sample in x.reshape(w.samples, -1)]
    return out


def answer(w: Work) -> bytes:
    """What the fake runner computes for a request: its values doubled (so an answer tells
    whose it is, and is not merely the request's bytes)."""
    return (np.frombuffer(w.payload, np.float32) * 2).tobytes()


def answer_values(output: Output) -> list[float]:
    """The fill value of each sample of an ``answer``, halved back."""
    x = np.frombuffer(output, np.float32).reshape(-1, int(np.prod(SAMPLE_SHAPE)))
    return [float(sample[0]) / 2 for sample in x]


# ---- fakes ----


@dataclass
class Submitted:
    items: list[Work]
    done: Done
    at: float  # time.monotonic() when the batcher handed it over
    abandonment: Abandonment
    finished: bool = False


class FakeRunner:
    """Records every batch; computes nothing until the test calls ``finish``, ``fail`` or
    ``finish_all``, which call back on the loop as the executor does."""

    def __init__(self, instances: int = 1) -> None:
        self._instances = instances
        self._loop = asyncio.get_running_loop()
        self.batches: list[Submitted] = []
        self._submitted = asyncio.Event()

    @property
    def instances(self) -> int:
        return self._instances

    def submit(self, items: Sequence[Work], done: Done, abandonment: Abandonment | None = None) -> None:
        assert items, "the batcher submitted an empty batch"
        assert sum(not b.finished for b in self.batches) < self._instances, "more batches at once than instances"
        assert abandonment is not None and not abandonment.abandoned, "a batch must start with someone waiting"
        self.batches.append(Submitted(list(items), done, time.monotonic(), abandonment))
        self._submitted.set()

    @property
    def values(self) -> list[list[float]]:
        """Per batch, the fill value of each of its samples."""
        return [values(b.items) for b in self.batches]

    def _release(self, index: int, result: BatchResult | BaseException) -> None:
        batch = self.batches[index]
        assert not batch.finished, f"batch {index} finished twice"
        batch.finished = True
        self._loop.call_soon(batch.done, result)

    def finish(
        self, index: int, outputs: list[Output | ServingError] | None = None, compute_seconds: float = 0.001
    ) -> None:
        """Batch ``index`` is done: each item gets ``outputs`` (default: its ``answer``)."""
        items = self.batches[index].items
        self._release(
            index, BatchResult(outputs if outputs is not None else [answer(w) for w in items], compute_seconds)
        )

    def fail(self, index: int, exc: BaseException) -> None:
        """Batch ``index`` failed as a whole."""
        self._release(index, exc)

    def finish_all(self) -> None:
        for i, batch in enumerate(self.batches):
            if not batch.finished:
                self.finish(i)

    async def dispatched(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` batches were submitted: an event, with a generous timeout for a
        batch that waits on a real-time delay."""
        async with asyncio.timeout(timeout):
            while len(self.batches) < count:
                self._submitted.clear()
                await self._submitted.wait()


@dataclass
class RecordingObserver:
    records: list[BatchRecord] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    expired: int = 0

    def batch_finished(self, record: BatchRecord) -> None:
        self.records.append(record)

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def request_expired(self) -> None:
        self.expired += 1


class Rig:
    """A started batcher with a fake runner and a recording observer (made on the running loop)."""

    def __init__(self, instances: int = 1, **policy: int) -> None:
        self.runner = FakeRunner(instances)
        self.observer = RecordingObserver()
        self.batcher = Batcher("lrn", self.runner, BatchingPolicy(**policy), self.observer)
        self.batcher.start()

    def send(
        self, value: float, samples: int = 1, deadline: float | None = None, **kwargs: Any
    ) -> asyncio.Task[Output]:
        return asyncio.create_task(self.batcher.submit(work(value, samples, **kwargs), deadline))

    async def occupy(self) -> asyncio.Task[Output]:
        """Send a blocker request and wait until the (only) instance computes it."""
        before = len(self.runner.batches)
        blocker = self.send(-1.0)
        await until(lambda: len(self.runner.batches) == before + 1, "the blocker was dispatched")
        return blocker

    async def queued(self, depth: int) -> None:
        await until(lambda: self.batcher.queue_depth == depth, f"queue depth {depth}")

    async def batches(self, count: int) -> None:
        await until(lambda: len(self.runner.batches) == count, f"{count} batches dispatched")


# ---- forming batches ----


@on_loop
async def test_full_batch_dispatches_without_waiting_for_the_delay() -> None:
    rig = Rig(max_batch_size=4, max_queue_delay_us=20_000_000)
    blocker = await rig.occupy()
    requests = [rig.send(float(i)) for i in range(4)]
    await rig.queued(4)  # five requests in the batcher at once: more are expected, but the batch is full
    rig.runner.finish(0)
    await rig.batches(2)  # within a few loop iterations, not 20 s
    assert rig.runner.values == [[-1.0], [0.0, 1.0, 2.0, 3.0]]
    rig.runner.finish_all()
    for task in [blocker, *requests]:
        await settled(task)
    assert [r.samples for r in rig.observer.records] == [1, 4]
    assert max(rig.observer.records[1].queue_seconds) < 20


@on_loop
async def test_partial_batch_waits_while_more_are_expected() -> None:
    rig = Rig(max_batch_size=32, max_queue_delay_us=20_000_000)
    blocker = await rig.occupy()
    requests = [rig.send(float(i)) for i in range(3)]
    await rig.queued(3)  # four requests were in the batcher at once; three are queued
    rig.runner.finish(0)
    await settled(blocker)
    await settle(ROUNDS)  # the instance is free, but the batch waits for company
    assert len(rig.runner.batches) == 1 and rig.batcher.queue_depth == 3
    assert not any(task.done() for task in requests)
    await rig.batcher.stop(timeout=0)  # what is still queued fails; it never ran
    for task in requests:
        with pytest.raises(Unavailable):
            await settled(task)
    assert len(rig.runner.batches) == 1


@on_loop
async def test_partial_batch_dispatches_once_the_delay_has_passed() -> None:
    delay = 0.05
    rig = Rig(max_batch_size=32, max_queue_delay_us=int(delay * 1e6))
    blocker = await rig.occupy()
    requests = [rig.send(float(i)) for i in range(3)]
    await rig.queued(3)
    rig.runner.finish(0)
    await settled(blocker)
    await rig.runner.dispatched(2)  # the delay's timer, on the loop's clock
    assert rig.runner.values == [[-1.0], [0.0, 1.0, 2.0]]
    rig.runner.finish(1)
    for task in requests:
        await settled(task)
    waited = rig.observer.records[1].queue_seconds
    assert waited[0] >= delay, f"dispatched a partial batch after {waited[0]:.4f} s, before the {delay} s delay"


@on_loop
async def test_a_lone_caller_never_waits_for_the_delay() -> None:
    rig = Rig(max_batch_size=32, max_queue_delay_us=20_000_000)
    for i in range(3):  # one after another: nobody to wait for
        task = rig.send(float(i))
        await rig.batches(i + 1)  # dispatched within a few loop iterations
        rig.runner.finish(i)
        assert answer_values(await settled(task)) == [float(i)]
    assert rig.runner.values == [[0.0], [1.0], [2.0]]
    assert all(max(r.queue_seconds) < 20 for r in rig.observer.records)


@on_loop
async def test_batch_is_formed_from_what_queued_while_the_instance_was_busy() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    requests = [rig.send(float(i)) for i in range(10)]
    await rig.queued(10)
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1)
    await rig.batches(3)
    rig.runner.finish(2)
    for task in [blocker, *requests]:
        await settled(task)
    assert [len(b.items) for b in rig.runner.batches] == [1, 8, 2]
    assert rig.runner.values == [[-1.0], [float(i) for i in range(8)], [8.0, 9.0]]  # in queue order


@on_loop
async def test_oversized_request_runs_alone() -> None:
    rig = Rig(max_batch_size=4, max_queue_delay_us=0)
    blocker = await rig.occupy()
    small = [rig.send(float(i)) for i in (1, 2)]
    big = rig.send(7.0, samples=6)
    await rig.queued(3)
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1)
    await rig.batches(3)
    rig.runner.finish(2)
    for task in [blocker, *small]:
        await settled(task)
    assert answer_values(await settled(big)) == [7.0] * 6
    assert rig.runner.values == [[-1.0], [1.0, 2.0], [7.0] * 6]


@on_loop
async def test_oversized_request_at_the_head_takes_no_company() -> None:
    rig = Rig(max_batch_size=4, max_queue_delay_us=0)
    blocker = await rig.occupy()
    big = rig.send(7.0, samples=6)
    small = [rig.send(float(i)) for i in (1, 2)]
    await rig.queued(3)
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1)
    await rig.batches(3)
    rig.runner.finish(2)
    for task in [blocker, big, *small]:
        await settled(task)
    assert rig.runner.values == [[-1.0], [7.0] * 6, [1.0, 2.0]]


@on_loop
async def test_incompatible_requests_are_not_batched_together() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    across = [rig.send(1.0, mode="across") for _ in range(3)]
    within = [rig.send(2.0, mode="within") for _ in range(3)]
    sized = [rig.send(3.0, size=3) for _ in range(2)]
    other_shape = rig.send(4.0, sample_shape=(4, 5, 5))
    other_dtype = rig.send(5.0, dtype=torch.float64)
    await rig.queued(10)
    rig.runner.finish(0)
    for count in range(2, 7):
        await rig.batches(count)
        rig.runner.finish(count - 1)
    for task in [blocker, *across, *within, *sized, other_shape, other_dtype]:
        await settled(task)
    assert rig.runner.values == [[-1.0], [1.0] * 3, [2.0] * 3, [3.0] * 2, [4.0], [5.0]]


# ---- failures ----


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (ResourceExhausted("model 'lrn': out of cuda memory"), ResourceExhausted("model 'lrn': out of cuda memory")),
        (RuntimeError("kernel crashed"), InternalError("model 'lrn': batch failed")),
    ],
    ids=["serving-error", "unexpected"],
)
@on_loop
async def test_a_failing_batch_fails_only_its_own_requests(failure: Exception, expected: Exception) -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    good = [rig.send(1.0, mode="across") for _ in range(3)]
    bad = [rig.send(2.0, mode="within") for _ in range(3)]
    await rig.queued(6)
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1)
    await rig.batches(3)
    assert rig.runner.values[2] == [2.0] * 3
    rig.runner.fail(2, failure)
    await settled(blocker)
    for task in good:
        assert answer_values(await settled(task)) == [1.0]
    errors: list[BaseException] = []
    for task in bad:
        await until(task.done)
        exc = task.exception()
        assert exc is not None
        errors.append(exc)
    for exc in errors:
        if isinstance(expected, ServingError):
            assert isinstance(exc, ServingError)
            assert (exc.code, exc.message) == (CODE.RESOURCE_EXHAUSTED, expected.message)
        else:
            assert type(exc) is InternalError
            assert str(exc) == str(expected)
        assert exc is not failure
    assert len({id(exc) for exc in errors}) == 3, "requests of a failed batch share one exception object"
    assert [r.failed for r in rig.observer.records] == [False, False, True]
    assert (rig.observer.records[2].requests, rig.observer.records[2].samples) == (3, 3)


@on_loop
async def test_a_runner_that_answers_too_few_outputs_fails_its_batch_and_the_batcher_goes_on() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    pair = [rig.send(1.0), rig.send(2.0)]
    await rig.queued(2)
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1, outputs=[answer(rig.runner.batches[1].items[0])])  # one output for two requests
    await settled(blocker)
    for task in pair:
        await until(task.done)
        assert type(task.exception()) is InternalError
    assert [r.failed for r in rig.observer.records] == [False, True]
    after = rig.send(3.0)
    await rig.batches(3)
    rig.runner.finish(2)
    assert answer_values(await settled(after)) == [3.0]


@on_loop
async def test_a_batch_whose_callers_all_left_is_abandoned_and_counted() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    leaving = [rig.send(1.0), rig.send(2.0)]
    staying = rig.send(3.0, mode="within")
    await rig.queued(3)
    rig.runner.finish(0)
    await rig.batches(2)
    abandonment = rig.runner.batches[1].abandonment
    assert rig.runner.values[1] == [1.0, 2.0]
    leaving[0].cancel()
    await until(leaving[0].done)
    assert not abandonment.abandoned, "one caller of the batch still waits"
    leaving[1].cancel()
    await until(leaving[1].done)
    assert abandonment.abandoned, "every caller of the batch left, but the runner is not told"
    rig.runner.fail(1, BatchAbandoned())  # what the executor answers when it stops early
    await rig.batches(3)
    assert not rig.runner.batches[2].abandonment.abandoned
    rig.runner.finish(2)
    assert answer_values(await settled(staying)) == [3.0]
    await settled(blocker)
    assert [(r.failed, r.abandoned) for r in rig.observer.records] == [(False, False), (True, True), (False, False)]


@on_loop
async def test_a_request_that_fails_inside_a_batch_fails_alone() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    requests = [rig.send(float(i)) for i in range(3)]
    await rig.queued(3)
    rig.runner.finish(0)
    await rig.batches(2)
    batch = rig.runner.batches[1].items
    assert values(batch) == [0.0, 1.0, 2.0]  # the bad one computes in the same batch as the good ones
    error = InvalidArgument("inputs[0]: sample 0 is not finite")
    rig.runner.finish(1, [answer(batch[0]), error, answer(batch[2])])
    await settled(blocker)
    assert answer_values(await settled(requests[0])) == [0.0]
    assert answer_values(await settled(requests[2])) == [2.0]
    with pytest.raises(ServingError) as info:
        await settled(requests[1])
    assert info.value is error  # made for this request alone
    assert (info.value.code, info.value.message) == (CODE.INVALID_ARGUMENT, "inputs[0]: sample 0 is not finite")
    assert rig.observer.records[1] == BatchRecord(
        samples=3, requests=3, compute_seconds=0.001, queue_seconds=rig.observer.records[1].queue_seconds, failed=False
    )


@pytest.mark.parametrize("ending", ["outputs", "error-for-it", "batch-fails"])
@on_loop
async def test_a_request_cancelled_while_its_batch_computes(ending: str) -> None:
    """The caller goes away (or its gRPC deadline passes, which cancels the handler) while its
    batch computes: the rest of the batch is answered, and nothing breaks when it comes back."""
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    requests = [rig.send(float(i)) for i in range(3)]
    await rig.queued(3)
    rig.runner.finish(0)
    await rig.batches(2)
    assert rig.runner.values[1] == [0.0, 1.0, 2.0]
    requests[1].cancel()
    await until(requests[1].done, "the cancellation was handled")
    assert requests[1].cancelled()
    batch = rig.runner.batches[1].items
    if ending == "outputs":
        rig.runner.finish(1)
    elif ending == "error-for-it":
        rig.runner.finish(1, [answer(batch[0]), InvalidArgument("inputs[0]: bad"), answer(batch[2])])
    else:
        rig.runner.fail(1, RuntimeError("kernel crashed"))
    await settled(blocker)
    for task in (requests[0], requests[2]):
        await until(task.done)
        if ending == "batch-fails":
            assert type(task.exception()) is InternalError
        else:
            assert answer_values(task.result()) == values([batch[requests.index(task)]])
    await until(lambda: len(rig.observer.records) == 2, "the batch was recorded")
    record = rig.observer.records[1]
    assert (record.samples, record.requests, record.failed) == (3, 3, ending == "batch-fails")
    await asyncio.wait_for(rig.batcher.wait_idle(), timeout=10)  # nothing left queued or running
    task = rig.send(5.0)  # and the instance is free again
    await rig.batches(3)
    rig.runner.finish(2)
    assert answer_values(await settled(task)) == [5.0]


@on_loop
async def test_a_deadline_that_passes_while_the_batch_computes_does_not_fail_it() -> None:
    """The deadline is the time by which compute must start: once started, the request is answered."""
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    deadline = time.monotonic() + 0.05
    task = rig.send(3.0, deadline=deadline)
    await rig.batches(1)
    # A loop timer after the batcher's own expiry timer for ``deadline`` (timers run in time order).
    loop = asyncio.get_running_loop()
    later = loop.create_future()
    loop.call_at(loop.time() + (deadline - time.monotonic()) + 0.001, later.set_result, None)
    await asyncio.wait_for(later, timeout=10)
    assert time.monotonic() >= deadline and not task.done()
    rig.runner.finish(0)
    assert answer_values(await settled(task)) == [3.0]


# ---- deadlines, cancellation, a full queue ----


@on_loop
async def test_expired_requests_are_dropped_before_compute() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    already_past = rig.send(5.0, deadline=time.monotonic() - 1)
    soon = rig.send(6.0, deadline=time.monotonic() + 0.05)
    survivor = rig.send(7.0)
    await asyncio.wait_for(asyncio.wait([already_past, soon]), timeout=10)
    # Failed at their deadlines, while the only instance is still busy: no waiting for a slot.
    assert not rig.runner.batches[0].finished and not survivor.done()
    for task in (already_past, soon):
        with pytest.raises(DeadlineExceeded) as info:
            await settled(task)
        assert info.value.code == CODE.DEADLINE_EXCEEDED
        assert "deadline passed" in info.value.message
    assert rig.batcher.queue_depth == 1  # they left the queue
    assert rig.observer.expired == 2  # and were counted
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1)
    await settled(blocker)
    assert answer_values(await settled(survivor)) == [7.0]
    assert rig.runner.values == [[-1.0], [7.0]]


@on_loop
async def test_a_request_already_past_its_deadline_is_never_computed() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)  # an instance is free
    task = rig.send(5.0, deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        await settled(task)
    await settle()
    assert rig.runner.batches == [] and rig.batcher.queue_depth == 0


@on_loop
async def test_cancelled_requests_are_not_computed() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    cancelled = rig.send(4.0)
    keep = rig.send(3.0)
    await rig.queued(2)
    cancelled.cancel()
    await rig.queued(1)  # it leaves the queue
    assert cancelled.cancelled()
    rig.runner.finish(0)
    await rig.batches(2)
    rig.runner.finish(1)
    await settled(blocker)
    assert answer_values(await settled(keep)) == [3.0]
    assert rig.runner.values == [[-1.0], [3.0]]


@on_loop
async def test_full_queue_is_resource_exhausted() -> None:
    rig = Rig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)
    blocker = await rig.occupy()
    queued = [rig.send(1.0), rig.send(2.0)]
    await rig.queued(2)
    with pytest.raises(ResourceExhausted) as info:
        await rig.batcher.submit(work(3.0), None)
    assert info.value.code == CODE.RESOURCE_EXHAUSTED
    assert "queue full" in info.value.message
    assert rig.batcher.queue_depth == 2
    for count in (2, 3):
        rig.runner.finish(count - 2)
        await rig.batches(count)
    rig.runner.finish(2)
    for task in [blocker, *queued]:
        await settled(task)
    assert rig.runner.values == [[-1.0], [1.0], [2.0]]


@pytest.mark.parametrize("dead", ["cancelled", "expired"])
@on_loop
async def test_dead_entries_make_room_in_a_full_queue(dead: str) -> None:
    """The newcomer runs before the dead entry's own clean-up (its task's wake-up, its expiry
    timer) gets a turn, so it finds the queue full of one live and one dead entry."""
    rig = Rig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)
    blocker = await rig.occupy()
    live = rig.send(1.0)
    if dead == "cancelled":
        victim = rig.send(2.0)
        await rig.queued(2)
        newcomer = rig.send(3.0)  # its first step is scheduled before the victim's wake-up
        victim.cancel()
    else:
        victim = rig.send(2.0, deadline=time.monotonic() - 1)
        newcomer = rig.send(3.0)  # runs in the same loop iteration as the victim's submit
    await until(victim.done, "the victim finished")  # by then the newcomer has had its turn
    assert not newcomer.done(), "a queue holding a dead entry refused a new request"
    assert rig.batcher.queue_depth == 2  # the live one and the newcomer
    if dead == "cancelled":
        assert victim.cancelled()
    else:
        with pytest.raises(DeadlineExceeded):
            victim.result()
    rig.runner.finish_all()
    for count in (2, 3):
        await rig.batches(count)
        rig.runner.finish_all()
    assert answer_values(await settled(newcomer)) == [3.0]
    for task in (blocker, live):
        await settled(task)
    assert rig.runner.values == [[-1.0], [1.0], [3.0]]


# ---- what each request of a batch gets ----


@on_loop
async def test_each_request_of_a_batch_gets_its_own_parameters_and_samples() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()
    items = [work(float(i + 1), samples=i + 1, alpha=1e-4 * (i + 1), beta=0.5 + i / 4, k=1.0 + i) for i in range(3)]
    requests = [asyncio.create_task(rig.batcher.submit(w, None)) for w in items]
    await rig.queued(3)
    rig.runner.finish(0)
    await rig.batches(2)
    batch = rig.runner.batches[1].items
    assert len(batch) == 3 and all(b is w for b, w in zip(batch, items, strict=True))  # in queue order
    assert [dict(b.scalars) for b in batch] == [
        {"alpha": 1e-4 * (i + 1), "beta": 0.5 + i / 4, "k": 1.0 + i} for i in range(3)
    ]
    rig.runner.finish(1)
    await settled(blocker)
    for i, task in enumerate(requests):
        assert answer_values(await settled(task)) == [float(i + 1)] * (i + 1)
    assert [r.samples for r in rig.observer.records] == [1, 6]


@pytest.mark.parametrize("shape", [(1, 8, 5, 5), (2, 96, 24, 24)], ids=["gathered", "each-in-place"])
@on_loop
async def test_each_request_of_a_computed_batch_gets_exactly_its_answer(shape: tuple[int, ...]) -> None:
    """Through the real executor: small requests are gathered into one kernel call, large ones
    (here 3 x 442 KB) each normalized in place from their own bytes."""
    servable = LRNServable(ModelConfig(name="lrn", kind="lrn"))
    servable.load(torch.device("cpu"))
    executor = Executor(servable, torch.device("cpu"), instances=1, threads=1)
    observer = RecordingObserver()
    batcher = Batcher("lrn", executor, BatchingPolicy(max_batch_size=8, max_queue_delay_us=0), observer)
    batcher.start()
    rng = np.random.default_rng(5)
    cases = [
        (rng.standard_normal(shape).astype(np.float32), {"alpha": 1e-4 * (i + 1), "beta": 0.5 + i / 4, "k": 1.0 + i})
        for i in range(3)
    ]
    try:
        # Queued in one loop iteration: the dispatch they schedule runs after all three.
        requests = [
            batcher.submit(Work(x.view(np.uint8).reshape(-1), x.shape, torch.float32, ("across", 5), p), None)
            for x, p in cases
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*requests), timeout=60)
    finally:
        executor.close()
    for (x, params), output in zip(cases, outputs, strict=True):
        expected = local_response_norm(torch.from_numpy(x), 5, params["alpha"], params["beta"], params["k"]).numpy()
        np.testing.assert_array_equal(np.frombuffer(output, np.float32).reshape(shape), expected)
    assert [(r.requests, r.samples) for r in observer.records] == [(3, 3 * shape[0])]


# ---- what the observer hears ----


@on_loop
async def test_observer_hears_queue_depths_and_batch_records() -> None:
    rig = Rig(max_batch_size=8, max_queue_delay_us=0)
    blocker = await rig.occupy()  # depth 1, then 0 when it is dispatched
    requests = [rig.send(float(i), samples=i + 1) for i in range(3)]  # 1, 2, 3
    await rig.queued(3)
    assert rig.observer.records == []  # nothing finished yet
    rig.runner.finish(0, compute_seconds=0.25)
    await rig.batches(2)  # 0 again
    rig.runner.fail(1, RuntimeError("kernel crashed"))
    await settled(blocker)
    for task in requests:
        await until(task.done)
        assert type(task.exception()) is InternalError
    assert rig.observer.depths == [1, 0, 1, 2, 3, 0]
    first, second = rig.observer.records
    assert (first.samples, first.requests, first.compute_seconds, first.failed) == (1, 1, 0.25, False)
    assert (second.samples, second.requests, second.compute_seconds, second.failed) == (6, 3, 0.0, True)
    assert len(first.queue_seconds) == 1 and len(second.queue_seconds) == 3
    assert all(q >= 0 for q in (*first.queue_seconds, *second.queue_seconds))


# ---- the concurrency window ----


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
