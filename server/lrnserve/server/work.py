"""The types that cross the batching boundary: what the data plane hands the batcher, what the
batcher hands a runner (the executor), and what comes back.

Both sides import them from here, so neither imports the other for a type it only passes on.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from .errors import ServingError


@dataclass(frozen=True, slots=True)
class Work:
    """One validated request, as the batcher and executor see it."""

    payload: np.ndarray  # the request tensor's bytes (uint8, C order, little-endian)
    shape: tuple[int, ...]  # N, C, H, W
    dtype: torch.dtype
    model_group: Hashable  # what the servable needs to run the batch (e.g. LRN mode, size)
    scalars: Mapping[str, float]  # per-request values, broadcast per sample

    @property
    def samples(self) -> int:
        return self.shape[0]

    @property
    def group(self) -> Hashable:
        """Requests with equal groups can be concatenated along dim 0."""
        return (self.shape[1:], self.dtype, self.model_group)

    def halves(self) -> tuple[Work, Work]:
        """The first and second half of this request's samples (it has at least two)."""
        half = self.samples // 2
        cut = self.payload.size // self.samples * half
        first = replace(self, payload=self.payload[:cut], shape=(half, *self.shape[1:]))
        second = replace(self, payload=self.payload[cut:], shape=(self.samples - half, *self.shape[1:]))
        return first, second


Output = bytes | memoryview  # a request's output tensor, C order, little-endian


@dataclass(frozen=True, slots=True)
class BatchResult:
    outputs: list[Output | ServingError]  # per work item, in order: its output's bytes or its own error
    compute_seconds: float  # assembly, host-to-device, compute, device-to-host


Done = Callable[[BatchResult | BaseException], None]


class Abandonment:
    """Set by the batcher once every request of a running batch has gone (cancelled, or past its
    caller's deadline); read by the executor's thread before compute and between a network's
    stages, so that nobody's work is computed for nobody (a plain attribute: a bool is read
    whole across threads)."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class BatchAbandoned(Exception):
    """A batch stopped before or during compute because nobody waits for its answers."""


class Runner(Protocol):
    """What the batcher needs of whatever computes its batches (the executor; a fake in tests)."""

    @property
    def instances(self) -> int:
        """How many batches it computes at once."""
        ...

    def submit(self, items: Sequence[Work], done: Done, abandonment: Abandonment | None = None) -> None:
        """Compute ``items`` as one batch; call ``done`` with the result, or the exception, on
        the submitting thread's event loop. Every item gets an output or its own error. Once
        ``abandonment`` is set the runner may stop early with ``BatchAbandoned``."""
        ...


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What happened to one executed batch (for metrics and statistics)."""

    samples: int
    requests: int
    compute_seconds: float
    queue_seconds: tuple[float, ...]
    failed: bool
    abandoned: bool = False  # stopped early: every request had gone (failed too)


class BatchObserver(Protocol):
    """Where a batcher reports what it did (telemetry), so that nothing reads its state back."""

    def batch_finished(self, record: BatchRecord) -> None: ...

    def queue_depth(self, depth: int) -> None: ...

    def request_expired(self) -> None:
        """A request's deadline passed before its compute started: it was dropped."""
        ...
