"""Dynamic batching: one queue per model, batches formed when an instance is free.

Whenever a model instance is free and requests wait, the batcher dispatches a
batch as soon as the requests compatible with the oldest one (same sample
shape, dtype and model group) fill ``max_batch_size`` samples, or when the
oldest has waited ``max_queue_delay_us``. Requests that cannot join (another
group, or too large to fit) keep their place for the next batch; a request
larger than ``max_batch_size`` runs alone. Cancelled requests are skipped and
expired ones fail with DEADLINE_EXCEEDED before any compute. When a batch
fails, each of its requests gets its own error; other batches are untouched.

The delay is spent only while company can be expected: the batcher tracks how
many requests were in it at once (queued or computing) over the last second or
so, and a batch waits for more only while it holds fewer than that. A lone
caller is never delayed; under concurrent load the wait lets batches grow past
what arrives while one computes, which on small requests saves most of the
per-batch cost (the hand-off to the instance thread and back).

Dispatching is callback-driven on the event loop (no task or future per
batch): a new request or a finished batch schedules one ``_dispatch`` at the
end of the loop's current round, so requests that arrive in the same round
join the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable
from .settings import BatchingPolicy
from .work import Abandonment, BatchAbandoned, BatchObserver, BatchRecord, BatchResult, Output, Runner, Work

logger = logging.getLogger(__name__)


class InternalError(Exception):
    """An unexpected failure inside a batch; the transport reports it as INTERNAL."""


@dataclass(eq=False, slots=True)  # identity: a queue entry is itself, whatever it holds
class Pending:
    work: Work
    future: asyncio.Future[Output]
    enqueued: float  # time.monotonic()
    deadline: float | None  # time.monotonic() by which compute must start
    dequeued: float = field(default=0.0)
    running: _Running | None = None  # the batch computing it


@dataclass(eq=False, slots=True)
class _Running:
    """A batch being computed: how many of its callers still wait, and the flag that tells the
    runner once none does. (A count, not the requests: a request refers to its batch, and a
    reference back would make a cycle that keeps every request's buffers until a collection.)"""

    waiting: int
    abandonment: Abandonment = field(default_factory=Abandonment)


PEAK_WINDOW_SECONDS = 0.5


class _WindowMax:
    """The largest value observed in the current or the previous window of ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._start = 0.0
        self._current = 0
        self._previous = 0

    def _roll(self, now: float) -> None:
        if now - self._start >= self.seconds:
            skipped = now - self._start >= 2 * self.seconds  # a whole window without observations
            self._previous = 0 if skipped else self._current
            self._current = 0
            self._start = now

    def observe(self, value: int, now: float) -> None:
        self._roll(now)
        if value > self._current:
            self._current = value

    def value(self, now: float) -> int:
        self._roll(now)
        return max(self._current, self._previous)


class Batcher:
    """One model's queue: ``submit`` a validated request and await its output.

    Contract: ``start`` on the event loop before the first ``submit``; everything else runs on
    that loop too. ``runner`` computes the batches (``instances`` at once); ``observer`` hears of
    every finished batch and every change of the queue's depth.
    """

    def __init__(
        self,
        name: str,
        runner: Runner,
        policy: BatchingPolicy,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._runner = runner
        self._observer = observer
        self._reported_depth = 0
        self._queue: deque[Pending] = deque()
        self._free = runner.instances  # instances not computing a batch
        self._running = 0  # batches being computed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatch_scheduled = False
        self._computing = 0  # requests in running batches
        self._concurrency = _WindowMax(PEAK_WINDOW_SECONDS)  # requests in the batcher at once, lately
        self._delay_timer: asyncio.TimerHandle | None = None
        self._closed = False  # no new requests
        self._stopped = False  # no more batches
        self._idle = asyncio.Event()  # set while nothing is queued or executing
        self._idle.set()
        self._quiet = asyncio.Event()  # set while no batch is executing
        self._quiet.set()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def submit(self, work: Work, deadline: float | None) -> Output:
        """Queue ``work`` and wait for its output (its samples' results, as bytes or a view).

        A request leaves the queue at once when its caller goes away or its deadline passes,
        so neither its memory nor its place in the queue outlives it.
        """
        if self._closed or self._loop is None:
            raise Unavailable(f"model '{self.name}' is shutting down; retry on another replica")
        if len(self._queue) >= self.policy.max_queue_size:
            self._drop_dead()
            if len(self._queue) >= self.policy.max_queue_size:
                raise ResourceExhausted(
                    f"model '{self.name}': queue full ({self.policy.max_queue_size} requests waiting); retry later"
                )
        loop = self._loop
        future: asyncio.Future[Output] = loop.create_future()
        pending = Pending(work, future, time.monotonic(), deadline)
        self._queue.append(pending)
        self._concurrency.observe(len(self._queue) + self._computing, pending.enqueued)
        self._update_idle()
        self._schedule_dispatch()
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, pending)
        try:
            return await future
        except asyncio.CancelledError:
            self._remove(pending)
            self._abandon_if_nobody_waits(pending.running)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            # An error raised here carries this frame in its traceback, and the future holds the
            # error: a cycle, through the timer's context, to the request's call and its share
            # of the byte budget, that only a garbage collection would free. Break it.
            del future, pending, timer

    def _expire(self, pending: Pending) -> None:
        """The deadline passed: fail the request now if it has not started computing."""
        if pending.dequeued or pending.future.done():
            return
        self._fail_expired(pending)
        self._remove(pending)

    @staticmethod
    def _abandon_if_nobody_waits(running: _Running | None) -> None:
        """A caller whose request is computing left (cancelled, or its gRPC deadline passed)."""
        if running is not None:
            running.waiting -= 1
            if running.waiting <= 0:
                running.abandonment.abandoned = True

    def _fail_expired(self, pending: Pending) -> None:
        if self._observer is not None:
            self._observer.request_expired()
        waited_ms = (time.monotonic() - pending.enqueued) * 1e3
        pending.future.set_exception(
            DeadlineExceeded(f"model '{self.name}': deadline passed after {waited_ms:.1f} ms in the queue")
        )

    def _remove(self, pending: Pending) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
        self._update_idle()

    def close(self) -> None:
        """Refuse new work; what is queued still runs."""
        self._closed = True

    async def wait_idle(self) -> None:
        """Until nothing is queued or running."""
        await self._idle.wait()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop dispatching, fail what is still queued, wait up to ``timeout`` for running batches."""
        self.close()
        self._stopped = True
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model '{self.name}' stopped before this request ran"))
        self._queue.clear()
        self._update_idle()
        if self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), timeout=timeout)

    # ---- dispatch ----

    def _schedule_dispatch(self) -> None:
        if self._free and not self._dispatch_scheduled and not self._stopped and self._loop is not None:
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start batches while an instance is free and the queue has one ready."""
        self._dispatch_scheduled = False
        max_samples = self.policy.max_batch_size
        delay = self.policy.max_queue_delay_us / 1e6
        while self._free and self._queue and not self._stopped:
            now = time.monotonic()
            first = self._queue[0]
            if not self._alive(first, now):
                self._queue.popleft()
                continue
            group = first.work.group
            waited = now - first.enqueued
            if waited < delay and self._expects_more(now) and not self._fills(group, max_samples):
                # Wait; a timer armed earlier for an older head fires early and lands here again.
                if self._delay_timer is None:
                    assert self._loop is not None
                    self._delay_timer = self._loop.call_later(delay - waited, self._delay_passed)
                break
            self._start(self._take(group, max_samples, now))
        self._update_idle()

    def _delay_passed(self) -> None:
        self._delay_timer = None
        self._dispatch()

    def _expects_more(self, now: float) -> bool:
        """Whether more requests can be expected soon: fewer are queued than were lately in
        the batcher at once."""
        return len(self._queue) < self._concurrency.value(now)

    def _fills(self, group: object, max_samples: int) -> bool:
        """Whether the queued requests of ``group`` make a full batch."""
        samples = 0
        for pending in self._queue:
            if pending.work.group == group and not pending.future.done():
                samples += pending.work.samples
                if samples >= max_samples:
                    return True
        return False

    def _take(self, group: object, max_samples: int, now: float) -> list[Pending]:
        """The oldest live request and the compatible ones behind it that fit, in queue order."""
        taken: list[Pending] = []
        samples = 0
        rest: deque[Pending] = deque()
        for pending in self._queue:
            if not self._alive(pending, now):
                continue
            n = pending.work.samples
            if pending.work.group == group and (not taken or (samples < max_samples and samples + n <= max_samples)):
                pending.dequeued = now
                taken.append(pending)
                samples += n
            else:
                rest.append(pending)
        self._queue = rest
        return taken

    def _start(self, batch: list[Pending]) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        self._free -= 1
        self._running += 1
        self._computing += len(batch)
        self._quiet.clear()
        running = _Running(len(batch))
        for pending in batch:
            pending.running = running
        self._runner.submit([p.work for p in batch], functools.partial(self._finished, batch), running.abandonment)

    def _finished(self, batch: list[Pending], result: BatchResult | BaseException) -> None:
        """A batch came back from its instance (on the event loop)."""
        self._free += 1
        self._running -= 1
        self._computing -= len(batch)
        if not self._running:
            self._quiet.set()
        samples = sum(p.work.samples for p in batch)
        waits = tuple(p.dequeued - p.enqueued for p in batch)
        if not isinstance(result, BaseException) and len(result.outputs) != len(batch):
            result = RuntimeError(f"runner answered {len(result.outputs)} outputs for {len(batch)} requests")
        if isinstance(result, BaseException):  # every request of the batch gets its own error
            abandoned = isinstance(result, BatchAbandoned)
            record = BatchRecord(samples, len(batch), 0.0, waits, failed=True, abandoned=abandoned)
            self._fail(batch, result)
        else:
            record = BatchRecord(samples, len(batch), result.compute_seconds, waits, failed=False)
            for pending, output in zip(batch, result.outputs, strict=True):
                if pending.future.done():
                    continue
                if isinstance(output, ServingError):
                    pending.future.set_exception(output)  # made for this request alone
                else:
                    pending.future.set_result(output)
        if self._queue:
            self._schedule_dispatch()
        self._update_idle()
        if self._observer is not None:
            self._observer.batch_finished(record)

    def _drop_dead(self) -> None:
        """Forget cancelled requests; fail expired ones (their timers may not have fired yet)."""
        now = time.monotonic()
        self._queue = deque(p for p in self._queue if self._alive(p, now))
        self._update_idle()

    def _alive(self, pending: Pending, now: float) -> bool:
        """False for a request that was cancelled or answered, or whose deadline passed (failed here)."""
        if pending.future.done():
            return False
        if pending.deadline is not None and now >= pending.deadline:
            self._fail_expired(pending)
            return False
        return True

    def _update_idle(self) -> None:
        """After every change of the queue: the idle event, and the depth for the observer."""
        if not self._queue and not self._running:
            self._idle.set()
        else:
            self._idle.clear()
        depth = len(self._queue)
        if depth != self._reported_depth and self._observer is not None:
            self._reported_depth = depth
            self._observer.queue_depth(depth)

    def _fail(self, batch: list[Pending], exc: BaseException) -> None:
        if isinstance(exc, BatchAbandoned):
            logger.debug("model '%s': batch of %d requests stopped: nobody waits for it", self.name, len(batch))
            make: Callable[[], Exception] = Unavailable(f"model '{self.name}': nobody waits for this batch").copy
        elif isinstance(exc, ServingError):
            logger.warning("model '%s': batch of %d requests failed: %s", self.name, len(batch), exc.message)
            make = exc.copy
        else:
            logger.error("model '%s': batch of %d requests failed", self.name, len(batch), exc_info=exc)
            make = lambda: InternalError(f"model '{self.name}': batch failed")  # noqa: E731
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(make())
