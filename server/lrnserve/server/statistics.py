"""Cumulative per-model-version statistics for the protocol's ModelStatistics RPC (Triton's semantics).

Counted on the event loop thread only, so no locking. Definitions, shared with
the Prometheus metrics so that the two agree:
- success / fail: requests by outcome, with their server-side end-to-end duration;
- queue, compute_infer: per request of every successfully executed batch (each
  request is charged its batch's whole compute time, as Triton does);
- inference_count / execution_count: samples and batches successfully executed;
- batch_stats: per batch size (samples), executions and their compute time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .work import BatchRecord


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, times: int = 1) -> None:
        self.count += times
        self.ns += round(seconds * 1e9) * times


@dataclass
class ModelStatistics:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)


class StatisticsStore:
    """Every served model version's statistics, by (model, version): Triton reports each version
    apart. Unknown pairs are ignored when recording (never a new entry)."""

    def __init__(self, models: list[str]) -> None:
        self._models = {(name, "1"): ModelStatistics() for name in models}

    def get(self, model: str, version: str) -> ModelStatistics:
        """The version's statistics; all zero for one that never served."""
        return self._models.get((model, version)) or ModelStatistics()

    def add(self, model: str, version: str) -> None:
        """A model version that began to be served after start-up (model control); a version
        served again keeps counting from where it was."""
        self._models.setdefault((model, version), ModelStatistics())

    def record_request(self, model: str, version: str, ok: bool, seconds: float) -> None:
        stats = self._models.get((model, version))
        if stats is None:
            return
        (stats.success if ok else stats.fail).add(seconds)
        stats.last_inference_ms = int(time.time() * 1000)

    def record_batch(self, model: str, version: str, record: BatchRecord) -> None:
        stats = self._models.get((model, version))
        if stats is None or record.failed:
            return
        stats.execution_count += 1
        stats.inference_count += record.samples
        for waited in record.queue_seconds:
            stats.queue.add(waited)
        stats.compute_infer.add(record.compute_seconds, times=record.requests)
        stats.batches.setdefault(record.samples, Duration()).add(record.compute_seconds)
