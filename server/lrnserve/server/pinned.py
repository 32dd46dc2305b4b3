"""Page-locked host buffers for CUDA copies, kept and reused across batches.

Allocating page-locked (pinned) memory takes far longer than the copy it serves (cudaHostAlloc
maps and locks every page), so an executor on CUDA takes its staging buffers from a pool: a
buffer is made once, for a power-of-two size class, and handed out again once its last user
lets go. Only pinned memory lets a host-to-device or device-to-host copy run asynchronously on
an instance's stream, overlapping the other instances' compute.

A buffer is handed out as a *lease*: a uint8 numpy array over the buffer's first bytes (torch
tensors for the copies are made over it with ``torch.from_numpy``). The buffer goes back to the
pool when the lease is gone: every tensor made over it and every memoryview of it (the responses'
parts of a batch's output) hold it, so an output buffer cannot be reused while an answer is still
being sent. (A numpy array, not a tensor, carries the lease because a Python tensor object may
die while views of its memory live on.) The
pool keeps at most ``limit_bytes`` of idle buffers; a lease beyond it is made and freed as usual.
``close`` (on unload) drops every idle buffer, and buffers still leased are freed with their
lease instead of coming back.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict

import numpy as np
import torch

MIN_CLASS = 64 * 1024  # smaller requests share the smallest class: one allocation serves many batch sizes


def size_class(nbytes: int) -> int:
    """The power of two at least ``nbytes`` (and at least MIN_CLASS) that a buffer is made for."""
    return max(MIN_CLASS, 1 << max(0, nbytes - 1).bit_length())


class PinnedPool:
    """Reusable host buffers; ``pin=False`` makes the same pool of ordinary memory (for CPU-only
    tests of the pooling itself, and for hosts without CUDA). Thread-safe: leases are taken on
    instance threads and usually released on the event loop's, when an answer has been sent."""

    def __init__(self, limit_bytes: int, pin: bool = True) -> None:
        self.limit_bytes = limit_bytes
        self._pin = pin
        self._lock = threading.Lock()
        self._idle: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._idle_bytes = 0
        self._closed = False
        self.made = 0  # buffers allocated, for tests and the load log
        self.reused = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def lease(self, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes (uint8, C order) of a pooled buffer, until the array is gone."""
        size = size_class(nbytes)
        with self._lock:
            idle = self._idle.get(size)
            buffer = idle.pop() if idle else None
            if buffer is not None:
                self._idle_bytes -= size
                self.reused += 1
        if buffer is None:
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
            with self._lock:
                self.made += 1
        leased: np.ndarray = buffer[:nbytes].numpy()
        weakref.finalize(leased, self._give_back, buffer)
        return leased

    def _give_back(self, buffer: torch.Tensor) -> None:
        size = buffer.numel()
        with self._lock:
            if self._closed or self._idle_bytes + size > self.limit_bytes:
                return  # freed with this reference
            self._idle[size].append(buffer)
            self._idle_bytes += size

    def close(self) -> None:
        """Free the idle buffers now; leased ones are freed when their lease ends."""
        with self._lock:
            self._closed = True
            self._idle.clear()
            self._idle_bytes = 0
