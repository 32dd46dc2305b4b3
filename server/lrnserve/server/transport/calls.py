"""Which inference calls are in progress, from the moment gRPC starts one.

gRPC looks up a call's handler when the call begins, before it reads the request message, in
the task that then runs the handler. ``CallTracker`` wraps that lookup for the inference
service: it gives each call a ``Call`` (its start time) in a context variable the handler can
read, and keeps a weak set of them, so a call is tracked exactly as long as gRPC's task for it
lives. A drain can then wait for every call that began before it, including those whose message
was still arriving, and refuse the rest.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from ..admission import Budget, Lease

_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("lrnserve_call", default=None)
POLL_SECONDS = 0.01


class Call:
    """One call of the service, alive exactly as long as gRPC's task for it, and with it its
    share of the in-flight byte budget."""

    __slots__ = ("__weakref__", "_tracker", "lease", "started")

    def __init__(self, tracker: CallTracker, started: float, lease: Lease) -> None:
        self._tracker = tracker
        self.started = started  # time.monotonic()
        self.lease = lease

    def __del__(self) -> None:
        # The call's share of the budget goes back with the call, even if something (a log
        # record's traceback, say) still refers to its lease.
        self.lease.release()
        self._tracker._ended()


def current_call() -> Call | None:
    """The call this handler (or deserializer) serves; None outside a tracked call."""
    return _CURRENT.get()


class CallTracker(grpc.GenericRpcHandler):
    """The inference service's handler lookup, tracking each call it starts."""

    def __init__(
        self, inner: grpc.GenericRpcHandler, budget: Budget, on_count: Callable[[int], None] | None = None
    ) -> None:
        """``on_count`` hears the number of calls in progress whenever it changes."""
        self._inner = inner
        self._budget = budget
        self._calls: weakref.WeakSet[Call] = weakref.WeakSet()
        self._count = 0
        self._on_count = on_count

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is not None:
            call = Call(self, time.monotonic(), self._budget.lease())
            self._calls.add(call)
            _CURRENT.set(call)
            self._count += 1
            if self._on_count is not None:
                self._on_count(self._count)
        return handler

    def _ended(self) -> None:
        self._count -= 1
        if self._on_count is not None:
            self._on_count(self._count)

    def in_progress(self, started_before: float = float("inf")) -> int:
        return sum(1 for call in list(self._calls) if call.started < started_before)

    async def wait_finished(self, started_before: float, timeout: float) -> bool:
        """Until every call that began before ``started_before`` ended; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.in_progress(started_before):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)
        return True
