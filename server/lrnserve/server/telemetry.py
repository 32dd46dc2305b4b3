"""One sink for what the server observes, feeding statistics and Prometheus alike.

Statistics (the ModelStatistics RPC) are always kept; Prometheus metrics only
when enabled. Requests naming a model this server does not serve are counted
under model="_unknown" so that clients cannot create unbounded label values.
"""

from __future__ import annotations

import grpc

from .batching import BatchRecord
from .metrics import Metrics
from .statistics import StatisticsStore

UNKNOWN_MODEL = "_unknown"


class Telemetry:
    def __init__(self, served: list[str], statistics: StatisticsStore, metrics: Metrics | None) -> None:
        self._served = set(served)
        self.statistics = statistics
        self.metrics = metrics

    def request_started(self) -> None:
        if self.metrics is not None:
            self.metrics.inflight.inc()

    def request_finished(self, model: str, code: grpc.StatusCode, seconds: float) -> None:
        label = model if model in self._served else UNKNOWN_MODEL
        self.statistics.record_request(label, code == grpc.StatusCode.OK, seconds)
        if self.metrics is not None:
            self.metrics.inflight.dec()
            self.metrics.record_request(label, code.name, seconds)

    def batch_finished(self, model: str, record: BatchRecord) -> None:
        self.statistics.record_batch(model, record)
        if self.metrics is not None:
            self.metrics.record_batch(model, record)

    def auth_rejected(self) -> None:
        if self.metrics is not None:
            self.metrics.auth_failures.inc()

    def model_loaded(self, model: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.model_load.labels(model).set(seconds)
