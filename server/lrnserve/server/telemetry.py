"""One sink for what the server observes, feeding statistics and Prometheus alike.

Created first and handed down: the data plane reports each request's outcome, each batcher
its batches and queue depth (through its model's ``ModelTelemetry``), the repository model
loads, the transport refused tokens. Nothing here reads server state back. Statistics (the
ModelStatistics RPC) are always kept; Prometheus metrics only when enabled. Requests naming a
model this server does not serve are counted under model="_unknown" so that clients cannot
create unbounded label values.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import torch

from .metrics import Metrics
from .statistics import ModelStatistics, StatisticsStore
from .work import BatchRecord

UNKNOWN_MODEL = "_unknown"


class ModelTelemetry:
    """What one model version's batcher reports (its ``BatchObserver``): statistics per version,
    Prometheus series per model."""

    def __init__(self, name: str, version: str, statistics: StatisticsStore, metrics: Metrics | None) -> None:
        self.name = name
        self.version = version
        self._statistics = statistics
        self._metrics = metrics

    def batch_finished(self, record: BatchRecord) -> None:
        self._statistics.record_batch(self.name, self.version, record)
        if self._metrics is not None:
            self._metrics.record_batch(self.name, record)

    def queue_depth(self, depth: int) -> None:
        if self._metrics is not None:
            self._metrics.record_queue_depth(self.name, depth)

    def request_expired(self) -> None:
        if self._metrics is not None:
            self._metrics.record_expired(self.name)


class Telemetry:
    """The server's observations: request outcomes, batches, loads, refused tokens.

    Contract: called on the event loop thread (statistics take no lock), except
    ``calls_in_progress``; ``served`` are the models at start-up (version 1 each), ``add_model``
    adds model versions later.
    """

    def __init__(self, served: Iterable[str], metrics: Metrics | None) -> None:
        names = list(served)
        self._names = set(names)  # the model labels of the Prometheus series
        self._statistics = StatisticsStore(names)
        self.metrics = metrics
        self._models = {(name, "1"): ModelTelemetry(name, "1", self._statistics, metrics) for name in names}

    def model(self, name: str, version: str = "1") -> ModelTelemetry:
        return self._models[(name, version)]

    def add_model(self, name: str, device: torch.device, queue_capacity: int, version: str = "1") -> None:
        """A model version loaded while serving (model control): its statistics and series from now on."""
        if (name, version) in self._models:
            return
        self._statistics.add(name, version)
        if self.metrics is not None and name not in self._names:
            self.metrics.add_model(name, device, queue_capacity)
        self._names.add(name)
        self._models[(name, version)] = ModelTelemetry(name, version, self._statistics, self.metrics)

    def model_state(self, model: str, version: str, state: str, failed: bool = False) -> None:
        """A model version's state changed (READY, UNAVAILABLE, UNLOADING, ...); ``failed``: a load failed."""
        if self.metrics is not None:
            self.metrics.record_model_state(model, version, state, failed)

    def statistics(self, name: str, version: str) -> ModelStatistics:
        return self._statistics.get(name, version)

    def request_started(self) -> None:
        if self.metrics is not None:
            self.metrics.request_started()

    def request_finished(self, model: str, code: grpc.StatusCode, seconds: float, version: str | None = None) -> None:
        """A request ended; ``version``: the one routed to (None when routing failed: counted in
        the metrics only, as no version's statistics)."""
        label = model if model in self._names else UNKNOWN_MODEL
        if version is not None:
            self._statistics.record_request(label, version, code == grpc.StatusCode.OK, seconds)
        if self.metrics is not None:
            self.metrics.request_finished(label, code.name, seconds)

    def calls_in_progress(self, count: int) -> None:
        """Inference-service calls begun and not yet ended, their message possibly still arriving
        (from any thread: the last reference to a call may go on gRPC's)."""
        if self.metrics is not None:
            self.metrics.calls_in_progress(count)

    def auth_rejected(self) -> None:
        if self.metrics is not None:
            self.metrics.auth_failures.inc()

    def repository_polled(self) -> None:
        if self.metrics is not None:
            self.metrics.repository_polls.inc()

    def model_loaded(self, model: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.model_load.labels(model).set(seconds)
