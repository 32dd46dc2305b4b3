"""Every Prometheus metric lrnserve exports, declared in one place on a registry passed in.

Names use the ``lrnserve_`` prefix and base units; labels are ``model``
everywhere, ``code`` on the request counter (the gRPC status name), ``device``
on compute time and device memory. Nothing is registered at import time.
"""

from __future__ import annotations

import math
import os
import platform
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


class _Histogram:
    """One histogram series' bucket counts and sum, kept by the event loop thread alone."""

    __slots__ = ("bounds", "counts", "created", "les", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.created = time.time()
        self.les: tuple[str, ...] = tuple(floatToGoString(b) for b in (*bounds, math.inf))  # type: ignore[no-untyped-call]
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive: value <= bound
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        counts, total = list(self.counts), self.total  # the counts from one moment (the list copied under the GIL)
        buckets: list[tuple[str, float]] = []
        running = 0
        for le, count in zip(self.les, counts, strict=True):
            running += count
            buckets.append((le, running))
        return buckets, total


class LoopSeries(Collector):
    """The series every request or batch updates, kept as plain numbers by the event loop thread
    and turned into metric families when Prometheus scrapes.

    Why not prometheus_client's own metrics: each of their updates takes a lock, and a small
    request made about a dozen (in flight up and down, the request counter, three histograms of
    two values each, the queue depth at every change): the event loop thread's CPU per [1,16,8,8]
    request under load at concurrency 16 was 309 us with them and 285 us with metrics off (8 %).
    Here an update is an addition.

    Contract: updated on the event loop thread only, except ``calls`` (an assignment, from any
    thread); ``collect`` runs on the metrics endpoint's thread and copies each table and each
    histogram's counts under the GIL (a copy allocates nothing per entry, so nothing can switch
    threads in the middle): a histogram's buckets and count are from one moment (its sum may lag
    or lead them by one observation), and a series added meanwhile is in the next scrape.
    """

    def __init__(self, max_batch_size: int) -> None:
        self.batch_buckets = batch_size_buckets(max_batch_size)
        # The "_created" samples, unless turned off as for prometheus_client's own metrics.
        self.created_series = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "").lower() not in ("true", "1", "t")
        self.requests: dict[tuple[str, str], int] = {}  # (model, code) -> count
        self.requests_created: dict[tuple[str, str], float] = {}  # (model, code) -> time.time() of the first
        self.request_duration: dict[str, _Histogram] = {}
        self.queue_duration: dict[str, _Histogram] = {}
        self.compute_duration: dict[tuple[str, str], _Histogram] = {}  # (model, device)
        self.batch_size: dict[str, _Histogram] = {}
        self.queue_depth: dict[str, int] = {}
        self.inflight = 0
        self.calls = 0

    def add_model(self, model: str, device: torch.device) -> _Histogram:
        """A served model's series, at zero; returns its compute-duration series."""
        self.count_request(model, "OK", 0)
        self.request_duration.setdefault(model, _Histogram(LATENCY_BUCKETS))
        self.queue_duration.setdefault(model, _Histogram(LATENCY_BUCKETS))
        self.batch_size.setdefault(model, _Histogram(self.batch_buckets))
        self.queue_depth.setdefault(model, 0)
        return self.compute_duration.setdefault((model, str(device)), _Histogram(LATENCY_BUCKETS))

    def count_request(self, model: str, code: str, add: int = 1) -> None:
        key = (model, code)
        count = self.requests.get(key)
        if count is None:
            self.requests_created[key] = time.time()
            count = 0
        self.requests[key] = count + add

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lrnserve_requests", "ModelInfer requests by gRPC status code.", labels=["model", "code"]
        )
        created = self.requests_created.copy()
        for (model, code), count in self.requests.copy().items():
            requests.add_metric([model, code], count, created.get((model, code)) if self.created_series else None)
        yield requests
        histograms: tuple[tuple[str, str, list[str], dict[Any, _Histogram]], ...] = (
            (
                "lrnserve_request_duration_seconds",
                "Server-side time from receiving a ModelInfer call to answering it.",
                ["model"],
                self.request_duration,
            ),
            (
                "lrnserve_queue_duration_seconds",
                "Time a request waited in its model's queue before its batch started.",
                ["model"],
                self.queue_duration,
            ),
            (
                "lrnserve_compute_duration_seconds",
                "Time to execute one batch, host-to-device and device-to-host copies included.",
                ["model", "device"],
                self.compute_duration,
            ),
            ("lrnserve_batch_size", "Samples per executed batch.", ["model"], self.batch_size),
        )
        for name, documentation, labels, series in histograms:
            family = HistogramMetricFamily(name, documentation, labels=labels)
            for key, histogram in series.copy().items():
                buckets, total = histogram.cumulative()
                values = list(key) if isinstance(key, tuple) else [key]
                family.add_metric(values, buckets, total)
                if self.created_series:  # as prometheus_client's own histograms have it
                    family.samples.append(
                        Sample(f"{name}_created", dict(zip(labels, values, strict=True)), histogram.created)
                    )
            yield family
        yield GaugeMetricFamily("lrnserve_inflight_requests", "ModelInfer requests being handled now.", self.inflight)
        yield GaugeMetricFamily(
            "lrnserve_calls_in_progress",
            "Inference calls begun and not yet ended, including those whose request is still arriving.",
            self.calls,
        )
        depth = GaugeMetricFamily("lrnserve_queue_depth", "Requests waiting in the model's queue.", labels=["model"])
        for model, value in self.queue_depth.copy().items():
            depth.add_metric([model], value)
        yield depth


class Metrics:
    """The Prometheus side of telemetry: every metric, registered on ``registry`` at start-up.

    Contract: only ``Telemetry`` records into it, on the event loop thread (``calls_in_progress``
    from any); the series each request or batch updates are ``LoopSeries`` tallies, the rest
    prometheus_client's metrics. The served models and their devices are known up front, so
    every model's series exist from the first scrape.
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
        self.series = LoopSeries(max_batch_size)
        registry.register(self.series)
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
        self._compute: dict[str, _Histogram] = {}  # each served model's compute series (its device's)
        self._expired: dict[str, Counter] = {}
        self._abandoned: dict[str, Counter] = {}
        for model, device in models.items():
            self.add_model(model, device, queue_capacity[model])

    def add_model(self, model: str, device: torch.device, queue_capacity: int) -> None:
        """Every series of one served model (at start-up, or when model control loads it)."""
        if model in self._compute:
            return
        self._compute[model] = self.series.add_model(model, device)
        self._expired[model] = self.expired.labels(model)
        self._abandoned[model] = self.abandoned.labels(model)
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

    def request_started(self) -> None:
        self.series.inflight += 1

    def request_finished(self, model: str, code: str, seconds: float) -> None:
        series = self.series
        series.inflight -= 1
        series.count_request(model, code)
        duration = series.request_duration.get(model)
        if duration is None:  # requests for models not served ("_unknown")
            duration = series.request_duration[model] = _Histogram(LATENCY_BUCKETS)
        duration.observe(seconds)

    def calls_in_progress(self, count: int) -> None:
        self.series.calls = count

    def record_queue_depth(self, model: str, depth: int) -> None:
        self.series.queue_depth[model] = depth

    def record_expired(self, model: str) -> None:
        self._expired[model].inc()

    def record_batch(self, model: str, record: BatchRecord) -> None:
        if record.abandoned:
            self._abandoned[model].inc()
        if record.failed:
            return
        series = self.series
        series.batch_size[model].observe(record.samples)
        self._compute[model].observe(record.compute_seconds)
        queue = series.queue_duration[model]
        for waited in record.queue_seconds:
            queue.observe(waited)
