"""Giving memory back once the server is idle.

Freed request buffers stay in the C heap (glibc keeps them per thread arena, and
``allocator_cache_bytes`` asks it to keep more), which is what makes the next request cheap but
lets resident memory ratchet after bursts. ``IdleTrimmer`` hears the number of calls in progress;
once none has been in progress for ``idle_seconds`` after some had been, it trims the heap
(``allocator.release_freed_memory``) on a worker thread. A busy server never trims.
"""

from __future__ import annotations

import asyncio
import logging

from lrnserve.client.allocator import release_freed_memory

logger = logging.getLogger(__name__)


class IdleTrimmer:
    """Contract: ``calls`` hears every change of the count, on the event loop thread (a change
    heard elsewhere, e.g. a call freed after the loop stopped, schedules nothing)."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._timer: asyncio.TimerHandle | None = None
        self._busy_since_trim = False
        self.trims = 0

    def calls(self, count: int) -> None:
        if self.idle_seconds <= 0:
            return
        if count:
            self._busy_since_trim = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._busy_since_trim and self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # the last call went away after the loop stopped: nothing to trim for
                return
            self._timer = loop.call_later(self.idle_seconds, self._trim)

    def _trim(self) -> None:
        self._timer = None
        self._busy_since_trim = False
        self.trims += 1
        asyncio.get_running_loop().run_in_executor(None, release_freed_memory)
        logger.debug("idle for %.1fs: freed heap memory given back", self.idle_seconds)
