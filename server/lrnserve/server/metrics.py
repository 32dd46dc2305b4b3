"""Every Prometheus metric lrnserve exports, declared in one place on a registry passed in.

Names use the ``lrnserve_`` prefix and base units; labels are ``model``
everywhere, ``code`` on the request counter (the gRPC status name), ``device``
on compute time and device memory. Nothing is registered at import time.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from lrnserve.client.version import __version__

from .work import BatchRecord

# 50 µs to 30 s.
LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to the first power of two >= the largest configured batch."""
    buckets, size = [], 1
    while True:
        buckets.append(float(size))
        if size >= max_batch_size:
            return tuple(buckets)
        size *= 2


class _DeviceMemory(Collector):
    """CUDA memory allocated by torch on each device models use; nothing on CPU-only servers.
    Read from torch at scrape time: torch, not the server, knows it."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cuda = self._cuda
        if not cuda:
            return
        family = GaugeMetricFamily(
            "lrnserve_device_memory_bytes", "Device memory allocated by torch.", labels=["device"]
        )
        for index in cuda:
            family.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
        yield family


class Metrics:
    """The Prometheus side of telemetry: every metric, registered on ``registry`` at start-up.

    Contract: only ``Telemetry`` records into it (prometheus_client's metrics take their own
    locks); the served models and their devices are known up front, so every model's series
    exist from the first scrape.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        models: dict[str, torch.device],
        queue_capacity: dict[str, int],
        max_batch_size: int,
    ) -> None:
        """``models``: each served model's device; ``queue_capacity``: its max_queue_size."""
        self.registry = registry
        self.request_duration = Histogram(
            "lrnserve_request_duration_seconds",
            "Server-side time from receiving a ModelInfer call to answering it.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "lrnserve_queue_duration_seconds",
            "Time a request waited in its model's queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "lrnserve_compute_duration_seconds",
            "Time to execute one batch, host-to-device and device-to-host copies included.",
            ["model", "device"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "lrnserve_batch_size",
            "Samples per executed batch.",
            ["model"],
            buckets=batch_size_buckets(max_batch_size),
            registry=registry,
        )
        self.requests = Counter(
            "lrnserve_requests", "ModelInfer requests by gRPC status code.", ["model", "code"], registry=registry
        )
        self.expired = Counter(
            "lrnserve_expired_requests",
            "Requests dropped before compute because their deadline passed in the queue.",
            ["model"],
            registry=registry,
        )
        self.abandoned = Counter(
            "lrnserve_abandoned_batches",
            "Batches stopped before or during compute because every request in them had gone "
            "(cancelled, or past the caller's deadline).",
            ["model"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "lrnserve_auth_failures", "Calls refused for a missing or wrong bearer token.", registry=registry
        )
        self.inflight = Gauge("lrnserve_inflight_requests", "ModelInfer requests being handled now.", registry=registry)
        self.calls = Gauge(
            "lrnserve_calls_in_progress",
            "Inference calls begun and not yet ended, including those whose request is still arriving.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "lrnserve_queue_depth", "Requests waiting in the model's queue.", ["model"], registry=registry
        )
        self.queue_capacity = Gauge(
            "lrnserve_queue_capacity",
            "Requests the model's queue holds before refusing with RESOURCE_EXHAUSTED.",
            ["model"],
            registry=registry,
        )
        self.model_load = Gauge(
            "lrnserve_model_load_seconds", "Time the model took to load and warm up.", ["model"], registry=registry
        )
        self.model_state = Gauge(
            "lrnserve_model_state",
            "1 for a model version's current state (READY, LOADING, UNAVAILABLE, UNLOADING).",
            ["model", "version", "state"],
            registry=registry,
        )
        self.model_loads = Counter(
            "lrnserve_model_loads", "Model versions loaded (start-up, loads and reloads).", ["model"], registry=registry
        )
        self.model_load_failures = Counter(
            "lrnserve_model_load_failures", "Model version loads that failed.", ["model"], registry=registry
        )
        self.repository_polls = Counter(
            "lrnserve_repository_polls",
            "Scans of the model repository folder completed in poll mode (each applies every change "
            "made before it began).",
            registry=registry,
        )
        self._states: dict[tuple[str, str], tuple[str, ...]] = {}
        self.build = Info("lrnserve_build", "Versions this server runs.", registry=registry)
        self.build.info(
            {
                "version": __version__,
                "torch": torch.__version__,
                "cuda": torch.version.cuda or "none",
                "python": platform.python_version(),
            }
        )
        registry.register(_DeviceMemory(models.values()))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        # labels() costs a lock and a tuple per call; the children never change, so keep them.
        # Every served model's series exist from the start, so rates and ratios are defined at once.
        self._counters: dict[tuple[str, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._batches: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        self._depths: dict[str, Gauge] = {}
        self._expired: dict[str, Counter] = {}
        self._abandoned: dict[str, Counter] = {}
        for model, device in models.items():
            self.add_model(model, device, queue_capacity[model])

    def add_model(self, model: str, device: torch.device, queue_capacity: int) -> None:
        """Every series of one served model (at start-up, or when model control loads it)."""
        if model in self._durations:
            return
        self._durations[model] = self.request_duration.labels(model)
        self._batches[model] = (
            self.batch_size.labels(model),
            self.compute_duration.labels(model, str(device)),
            self.queue_duration.labels(model),
        )
        self._depths[model] = self.queue_depth.labels(model)
        self._depths[model].set(0)
        self._expired[model] = self.expired.labels(model)
        self._abandoned[model] = self.abandoned.labels(model)
        self._counters[(model, "OK")] = self.requests.labels(model, "OK")
        self.queue_capacity.labels(model).set(queue_capacity)

    def record_model_state(self, model: str, version: str, state: str, failed: bool) -> None:
        """``lrnserve_model_state{model, version, state}`` is 1 for the version's state, its other
        states' series removed; loads and load failures are counted per model."""
        for old in self._states.pop((model, version), ()):
            self.model_state.remove(model, version, old)
        self.model_state.labels(model, version, state).set(1)
        self._states[(model, version)] = (state,)
        if state == "READY" and not failed:
            self.model_loads.labels(model).inc()
        if failed:
            self.model_load_failures.labels(model).inc()

    def record_request(self, model: str, code: str, seconds: float) -> None:
        counter = self._counters.get((model, code))
        if counter is None:
            counter = self._counters[(model, code)] = self.requests.labels(model, code)
        counter.inc()
        duration = self._durations.get(model)
        if duration is None:  # requests for models not served ("_unknown")
            duration = self._durations[model] = self.request_duration.labels(model)
        duration.observe(seconds)

    def record_queue_depth(self, model: str, depth: int) -> None:
        self._depths[model].set(depth)

    def record_expired(self, model: str) -> None:
        self._expired[model].inc()

    def record_batch(self, model: str, record: BatchRecord) -> None:
        if record.abandoned:
            self._abandoned[model].inc()
        if record.failed:
            return
        batch_size, compute, queue = self._batches[model]
        batch_size.observe(record.samples)
        compute.observe(record.compute_seconds)
        for waited in record.queue_seconds:
            queue.observe(waited)
