"""Dynamic batching: one queue per model, batches formed when an instance is free.

The batcher waits for a free model instance, then for work: it dispatches a
batch as soon as the requests compatible with the oldest one (same sample
shape, dtype and model group) fill ``max_batch_size`` samples, or when the
oldest has waited ``max_queue_delay_us``. Requests that cannot join (another
group, or too large to fit) keep their place for the next batch; a request
larger than ``max_batch_size`` runs alone. Cancelled requests are skipped and
expired ones fail with DEADLINE_EXCEEDED before any compute. When a batch
fails, each of its requests gets its own error; other batches are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable
from .executor import BatchResult, Executor, Work
from .settings import BatchingPolicy

logger = logging.getLogger(__name__)


class InternalError(Exception):
    """An unexpected failure inside a batch; the transport reports it as INTERNAL."""


@dataclass(eq=False)  # identity: a queue entry is itself, whatever it holds
class Pending:
    work: Work
    future: asyncio.Future[torch.Tensor]
    enqueued: float  # time.monotonic()
    deadline: float | None  # time.monotonic() by which compute must start
    dequeued: float = field(default=0.0)


@dataclass(frozen=True)
class BatchRecord:
    """What happened to one executed batch (for metrics and statistics)."""

    samples: int
    requests: int
    compute_seconds: float
    queue_seconds: tuple[float, ...]
    failed: bool


BatchListener = Callable[[BatchRecord], None]


class Batcher:
    def __init__(
        self,
        name: str,
        executor: Executor,
        policy: BatchingPolicy,
        on_batch: BatchListener | None = None,
    ) -> None:
        self.name = name
        self.executor = executor
        self.policy = policy
        self._on_batch = on_batch
        self._queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(executor.instances)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._idle = asyncio.Event()  # set while nothing is queued or executing
        self._idle.set()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name=f"batcher-{self.name}")

    async def submit(self, work: Work, deadline: float | None) -> torch.Tensor:
        """Queue ``work`` and wait for its output (the CPU tensor of its samples).

        A request leaves the queue at once when its caller goes away or its deadline passes,
        so neither its memory nor its place in the queue outlives it.
        """
        if self._closed:
            raise Unavailable(f"model '{self.name}' is shutting down; retry on another replica")
        if len(self._queue) >= self.policy.max_queue_size:
            self._drop_dead()
            if len(self._queue) >= self.policy.max_queue_size:
                raise ResourceExhausted(
                    f"model '{self.name}': queue full ({self.policy.max_queue_size} requests waiting); retry later"
                )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        pending = Pending(work, future, time.monotonic(), deadline)
        self._queue.append(pending)
        self._arrived.set()
        self._update_idle()
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, pending)
        try:
            return await future
        except asyncio.CancelledError:
            self._remove(pending)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, pending: Pending) -> None:
        """The deadline passed: fail the request now if it has not started computing."""
        if pending.dequeued or pending.future.done():
            return
        self._fail_expired(pending)
        self._remove(pending)

    def _fail_expired(self, pending: Pending) -> None:
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
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model '{self.name}' stopped before this request ran"))
        self._queue.clear()
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)

    # ---- dispatch ----

    async def _dispatch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._update_idle()

    def _drop_dead(self) -> None:
        """Forget cancelled requests; fail expired ones (their timers may not have fired yet)."""
        now = time.monotonic()
        alive: deque[Pending] = deque()
        for pending in self._queue:
            if pending.future.done():
                continue
            if pending.deadline is not None and now >= pending.deadline:
                self._fail_expired(pending)
                continue
            alive.append(pending)
        self._queue = alive
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._queue and not self._running:
            self._idle.set()
        else:
            self._idle.clear()

    async def _next_batch(self) -> list[Pending]:
        max_samples = self.policy.max_batch_size
        delay = self.policy.max_queue_delay_us / 1e6
        while True:
            self._drop_dead()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._queue[0]
            group = first.work.group
            ready = sum(p.work.samples for p in self._queue if p.work.group == group)
            waited = time.monotonic() - first.enqueued
            if ready >= max_samples or waited >= delay:
                return self._take(group, max_samples)
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=delay - waited)

    def _take(self, group: object, max_samples: int) -> list[Pending]:
        first = self._queue.popleft()
        taken, samples, rest = [first], first.work.samples, deque[Pending]()
        for pending in self._queue:
            fits = samples + pending.work.samples <= max_samples
            if pending.work.group == group and fits and samples < max_samples:
                taken.append(pending)
                samples += pending.work.samples
            else:
                rest.append(pending)
        self._queue = rest
        now = time.monotonic()
        for pending in taken:
            pending.dequeued = now
        return taken

    async def _execute(self, batch: list[Pending]) -> None:
        record: BatchRecord | None = None
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            samples = sum(p.work.samples for p in live)
            waits = tuple(p.dequeued - p.enqueued for p in live)
            try:
                result: BatchResult = await self.executor.run([p.work for p in live])
            except Exception as exc:  # every request of the batch gets its own error
                record = BatchRecord(samples, len(live), 0.0, waits, failed=True)
                self._fail(live, exc)
                return
            record = BatchRecord(samples, len(live), result.compute_seconds, waits, failed=False)
            for pending, output in zip(live, result.outputs, strict=True):
                if pending.future.done():
                    continue
                if isinstance(output, ServingError):
                    pending.future.set_exception(output)  # made for this request alone
                else:
                    pending.future.set_result(output)
        finally:
            self._slots.release()
            if record is not None and self._on_batch is not None:
                self._on_batch(record)

    def _fail(self, batch: list[Pending], exc: Exception) -> None:
        if isinstance(exc, ServingError):
            logger.warning("model '%s': batch of %d requests failed: %s", self.name, len(batch), exc.message)
            make: Callable[[], Exception] = lambda: type(exc)(exc.message)  # noqa: E731
        else:
            logger.error("model '%s': batch of %d requests failed", self.name, len(batch), exc_info=exc)
            make = lambda: InternalError(f"model '{self.name}': batch failed")  # noqa: E731
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(make())
