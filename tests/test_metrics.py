"""Metrics and statistics: exact accounting, promtool, a real Prometheus, the operator files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from harness import ServerThread, free_port, infer_request, lrn_model, metric_value, repo_root, scrape, settings, stub
from prometheus_client.parser import text_string_to_metric_families
from promql import metric_names

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.settings import ModelConfig

DEPLOY = repo_root() / "deploy"
MISSING_PROMETHEUS = (
    "Debian's 'prometheus' package (prometheus + promtool) is not installed; `make test` and .ci/run "
    "install it with apt-get. Install it (apt-get install prometheus) to run the metrics tests."
)


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(MISSING_PROMETHEUS)
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = settings(
        lrn_model("lrn", max_batch_size=4, max_queue_delay_us=0),
        ModelConfig(name="cifar10_full", kind="cifar10_full"),
    )
    with ServerThread(config) as running:
        yield running


def call(channel: grpc.Channel, request: pb.ModelInferRequest) -> grpc.StatusCode:
    try:
        stub(channel).ModelInfer(request, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]


def statistics(channel: grpc.Channel, model: str) -> Any:
    (entry,) = stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats
    return entry


def test_exact_accounting(server: ServerThread) -> None:
    assert server.server.metrics_port
    with server.channel() as channel:
        before = scrape(server.server.metrics_port)
        assert metric_value(before, "lrnserve_requests_total", model="lrn", code="OK") == 0
        samples = [1, 2, 3, 1, 5]  # 5 > max_batch_size 4: that one runs alone
        lrn_wall = 0.0  # the client's own clock around every lrn call, sequential

        def timed(request: pb.ModelInferRequest) -> grpc.StatusCode:
            nonlocal lrn_wall
            start = time.perf_counter()
            code = call(channel, request)
            lrn_wall += time.perf_counter() - start
            return code

        for n in samples:
            x = np.ones((n, 3, 4, 4), np.float32)
            assert timed(infer_request("lrn", x)) == grpc.StatusCode.OK
        bad = infer_request("lrn", np.ones((1, 3, 4, 4), np.float32), {"alpha": -1.0})
        assert timed(bad) == grpc.StatusCode.INVALID_ARGUMENT
        assert timed(bad) == grpc.StatusCode.INVALID_ARGUMENT
        unknown = infer_request("vgg", np.ones((1, 3, 4, 4), np.float32))
        assert call(channel, unknown) == grpc.StatusCode.NOT_FOUND
        for n in (2, 1, 1):
            x = np.ones((n, 3, 32, 32), np.float32)
            assert call(channel, infer_request("cifar10_full", x)) == grpc.StatusCode.OK
        lrn_stats, cifar_stats = statistics(channel, "lrn"), statistics(channel, "cifar10_full")
        text = scrape(server.server.metrics_port)

    def value(name: str, **labels: str) -> float:
        found = metric_value(text, name, **labels)
        assert found is not None, (name, labels)
        return found

    assert value("lrnserve_requests_total", model="lrn", code="OK") == 5
    assert value("lrnserve_requests_total", model="lrn", code="INVALID_ARGUMENT") == 2
    assert value("lrnserve_requests_total", model="_unknown", code="NOT_FOUND") == 1
    assert value("lrnserve_requests_total", model="cifar10_full", code="OK") == 3
    assert value("lrnserve_request_duration_seconds_count", model="lrn") == 7
    assert value("lrnserve_request_duration_seconds_count", model="cifar10_full") == 3
    # Requests were sequential: one batch each, of exactly the samples sent.
    assert value("lrnserve_batch_size_count", model="lrn") == 5
    assert value("lrnserve_batch_size_sum", model="lrn") == sum(samples)
    assert value("lrnserve_batch_size_bucket", model="lrn", le="1.0") == 2
    assert value("lrnserve_batch_size_bucket", model="lrn", le="4.0") == 4
    assert value("lrnserve_batch_size_bucket", model="lrn", le="+Inf") == 5
    assert value("lrnserve_batch_size_sum", model="cifar10_full") == 4
    assert value("lrnserve_queue_duration_seconds_count", model="lrn") == 5
    assert value("lrnserve_compute_duration_seconds_count", model="lrn", device="cpu") == 5
    assert value("lrnserve_inflight_requests") == 0
    assert value("lrnserve_queue_depth", model="lrn") == 0
    assert value("lrnserve_queue_capacity", model="lrn") == 256
    assert value("lrnserve_model_load_seconds", model="cifar10_full") > 0
    assert metric_value(text, "lrnserve_build_info", version=server.server.dataplane.server_metadata().version) == 1
    assert value("process_resident_memory_bytes") > 0
    assert metric_value(text, "lrnserve_device_memory_bytes") is None  # CPU only: omitted
    # The statistics RPC tells the same story.
    stats = lrn_stats.inference_stats
    assert (stats.success.count, stats.fail.count, stats.queue.count) == (5, 2, 5)
    assert (lrn_stats.inference_count, lrn_stats.execution_count) == (sum(samples), 5)
    assert {b.batch_size: b.compute_infer.count for b in lrn_stats.batch_stats} == {1: 2, 2: 1, 3: 1, 5: 1}
    assert (cifar_stats.inference_count, cifar_stats.execution_count) == (4, 3)
    assert cifar_stats.last_inference > 0
    compute_ns = sum(b.compute_infer.ns for b in lrn_stats.batch_stats)
    compute_s = value("lrnserve_compute_duration_seconds_sum", model="lrn", device="cpu")
    assert math.isclose(compute_ns / 1e9, compute_s, rel_tol=1e-3, abs_tol=1e-6)
    # Request durations, against the client's own clock: every lrn request (successes and
    # failures alike) took some time on the server, and no more than the caller waited for it.
    statistics_seconds = (stats.success.ns + stats.fail.ns) / 1e9
    prometheus_seconds = value("lrnserve_request_duration_seconds_sum", model="lrn")
    for seconds in (statistics_seconds, prometheus_seconds):
        assert 0 < seconds <= lrn_wall, (seconds, lrn_wall)
    assert stats.success.ns > 0 and stats.fail.ns > 0
    # Computing is part of answering: its time is within the requests' time.
    assert 0 < compute_s <= statistics_seconds and compute_s <= prometheus_seconds, (compute_s, statistics_seconds)


def test_statistics_for_all_models_and_errors(server: ServerThread) -> None:
    with server.channel() as channel:
        response = stub(channel).ModelStatistics(pb.ModelStatisticsRequest(), timeout=10)
        assert [m.name for m in response.model_stats] == ["lrn", "cifar10_full"]
        with pytest.raises(grpc.RpcError) as info:
            stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="vgg"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "statistics" in stub(channel).ServerMetadata(pb.ServerMetadataRequest()).extensions


def test_openmetrics_on_request(server: ServerThread) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")
    assert "lrnserve_requests_total" in body


def test_latency_buckets_span_50us_to_30s(server: ServerThread) -> None:
    text = scrape(server.server.metrics_port)
    for family in text_string_to_metric_families(text):
        if family.name == "lrnserve_request_duration_seconds":
            bounds = sorted(
                float(s.labels["le"])
                for s in family.samples
                if s.name.endswith("_bucket") and s.labels["model"] == "lrn"
            )
            assert bounds[0] == 50e-6 and bounds[-2] == 30.0 and math.isinf(bounds[-1])
            return
    pytest.fail("no request duration histogram")


def test_loop_series_expose_what_prometheus_clients_metrics_would() -> None:
    """The server's lock-free request series against prometheus_client's own Counter, Gauge and
    Histogram fed the same observations (values on bucket bounds included: le is inclusive)."""
    import torch
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import generate_latest

    from lrnserve.server.metrics import LATENCY_BUCKETS, LoopSeries, Metrics
    from lrnserve.server.work import BatchRecord

    ours = CollectorRegistry()
    metrics = Metrics(ours, {"m": torch.device("cpu")}, {"m": 8}, max_batch_size=8)
    reference = CollectorRegistry()
    requests = Counter("lrnserve_requests", "", ["model", "code"], registry=reference)
    latency = {"buckets": LATENCY_BUCKETS, "registry": reference}
    duration = Histogram("lrnserve_request_duration_seconds", "", ["model"], **latency)
    queue = Histogram("lrnserve_queue_duration_seconds", "", ["model"], **latency)
    sizes = Histogram("lrnserve_batch_size", "", ["model"], buckets=(1, 2, 4, 8), registry=reference)
    inflight = Gauge("lrnserve_inflight_requests", "", registry=reference)
    rng = np.random.default_rng(7)
    seconds = [*LATENCY_BUCKETS, 0.0, 40.0, *(10.0 ** rng.uniform(-6, 2, 200))]
    for i, value in enumerate(seconds):
        code = "OK" if i % 3 else "INVALID_ARGUMENT"
        metrics.request_started()
        metrics.request_finished("m", code, float(value))
        requests.labels("m", code).inc()
        duration.labels("m").observe(float(value))
    metrics.request_started()
    inflight.set(1)
    for samples in (1, 2, 3, 8, 9):
        record = BatchRecord(samples, 2, 0.001, (samples * 1e-4, 0.5), failed=False)
        metrics.record_batch("m", record)
        sizes.labels("m").observe(samples)
        for waited in record.queue_seconds:
            queue.labels("m").observe(waited)

    def samples_of(registry: CollectorRegistry, names: set[str]) -> dict[tuple[str, tuple[Any, ...]], float]:
        found = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                if family.name in names:  # a "_created" sample's time differs: only its presence counts
                    value = 0.0 if sample.name.endswith("_created") else sample.value
                    found[(sample.name, tuple(sorted(sample.labels.items())))] = value
        return found

    names = {
        "lrnserve_requests",
        "lrnserve_request_duration_seconds",
        "lrnserve_queue_duration_seconds",
        "lrnserve_batch_size",
        "lrnserve_inflight_requests",
    }
    expected = samples_of(reference, names)
    got = samples_of(ours, names)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert isinstance(metrics.series, LoopSeries)


def test_promtool_accepts_the_exposition(server: ServerThread) -> None:
    promtool = require("promtool")
    text = scrape(server.server.metrics_port)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_deploy_files() -> None:
    promtool = require("promtool")
    config = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stdout + config.stderr
    rules = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
    result = subprocess.run([promtool, "check", "rules", *map(str, rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names | {"lrnserve_device_memory_bytes", "up"}  # CUDA-only gauge; Prometheus' own


def rule_expressions() -> tuple[list[str], set[str]]:
    exprs, recorded = [], set()
    for path in (DEPLOY / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                exprs.append(rule["expr"])
                if "record" in rule:
                    recorded.add(rule["record"])
    return exprs, recorded


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lrnserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"].removeprefix("label_values(").split(",")[0] for v in dashboard["templating"]["list"]]
    return exprs


def test_rules_and_dashboard_use_only_exported_metrics(server: ServerThread) -> None:
    exported = exported_names(scrape(server.server.metrics_port))
    exprs, recorded = rule_expressions()
    known = exported | recorded
    dashboard = dashboard_expressions()
    assert len(exprs) >= 14 and len(dashboard) >= 10
    for expr in exprs + dashboard:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= known, f"{expr!r} refers to {sorted(names - known)}, not exported"
    assert metric_names("sum by (le) (rate(foo_bucket{a='b'}[5m])) / bar") == {"foo_bucket", "bar"}


def test_dashboard_covers_what_operators_need() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lrnserve.json").read_text())
    joined = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "lrnserve_request_duration_seconds_bucket",
        "lrnserve_requests_total",
        "lrnserve_batch_size_bucket",
        "lrnserve_queue_depth",
        "lrnserve_device_memory_bytes",
    ):
        assert metric in joined
    assert 'code!="OK"' in joined
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert provisioning["datasources"][0]["uid"] == "prometheus"


# ---- a real Prometheus scraping a real server ----


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.fixture
def prometheus(server: ServerThread, tmp_path: Path) -> Iterator[int]:
    binary = require("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.server.metrics_port}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if query(port, "up") and query(port, 'up{job="lrnserve"} == 1'):
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "Prometheus never scraped the server"
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


def test_real_prometheus_scrapes_counts_and_p99(server: ServerThread, prometheus: int) -> None:
    requests = {
        "lrn": infer_request("lrn", np.ones((1, 8, 6, 6), np.float32)),
        "cifar10_full": infer_request("cifar10_full", np.ones((1, 3, 32, 32), np.float32)),
    }
    with server.channel() as channel:
        start = {m: statistics(channel, m).inference_stats.success.count for m in requests}
        sent = dict.fromkeys(requests, 0)
        failed: list[tuple[str, object]] = []  # (model, what went wrong), asserted below
        lock = threading.Lock()
        stop = time.monotonic() + 4.0

        def load(model: str) -> None:
            try:
                while time.monotonic() < stop:
                    code = call(channel, requests[model])
                    with lock:
                        if code == grpc.StatusCode.OK:
                            sent[model] += 1
                        else:
                            failed.append((model, code))
            except BaseException as exc:
                with lock:
                    failed.append((model, exc))

        threads = [threading.Thread(target=load, args=(m,)) for m in requests for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not [t.name for t in threads if t.is_alive()], "load threads still running"
    assert not failed, failed[:5]
    for model, count in sent.items():
        assert count > 10
        expected = start[model] + count
        deadline = time.monotonic() + 30
        while True:
            result = query(prometheus, f'sum(lrnserve_requests_total{{model="{model}", code="OK"}})')
            seen = float(result[0]["value"][1]) if result else -1
            if seen == expected:
                break
            assert time.monotonic() < deadline, f"{model}: Prometheus saw {seen} requests, sent {expected}"
            time.sleep(0.5)
        p99 = query(
            prometheus,
            "histogram_quantile(0.99, sum by (le) "
            f'(rate(lrnserve_request_duration_seconds_bucket{{model="{model}"}}[30s])))',
        )
        value = float(p99[0]["value"][1])
        assert math.isfinite(value) and 0 < value < 30, (model, value)
    # The recording rules evaluate against the same data.
    recorded = query(prometheus, "model:lrnserve_requests:rate5m")
    assert {r["metric"]["model"] for r in recorded} >= set(requests)
