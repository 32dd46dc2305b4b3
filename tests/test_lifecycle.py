"""``lrnserve serve`` as a process: start-up errors, SIGTERM drain, exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import free_port, infer_request, metric_value, output_array, scrape, serve_process, stub, wait_ready

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc

CONFIG = """
[server]
grace_seconds = 60
[models.alexnet]
max_batch_size = 1
max_queue_delay_us = 0
max_queue_size = 64
"""


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path: Path) -> None:
    config = tmp_path / "drain.toml"
    config.write_text(CONFIG)
    metrics_port = free_port()
    with serve_process("--config", str(config), metrics_port=metrics_port) as (proc, target):
        channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        images = np.random.default_rng(0).standard_normal((1, 3, 227, 227)).astype(np.float32)
        request = infer_request("alexnet", images)
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(stub(channel).ModelInfer, request, timeout=120) for _ in range(24)]
            # SIGTERM while the server holds at least 8 accepted, unanswered requests: all of
            # those must still be answered; only requests arriving after SIGTERM may be refused.
            deadline = time.monotonic() + 60
            while True:
                done_at_read = sum(f.done() for f in futures)
                inflight = metric_value(scrape(metrics_port), "lrnserve_inflight_requests") or 0
                if inflight >= 8:
                    break
                assert time.monotonic() < deadline, "requests never queued up"
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                stub(channel).ModelInfer(request, timeout=10)
            answered = []
            for future in futures:
                try:
                    answered.append(output_array(future.result(timeout=120)))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert "shutting down" in exc.details()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        assert len(answered) >= done_at_read + inflight, (len(answered), done_at_read, inflight)
        for output in answered:
            assert output.shape == (1, 1000)
            np.testing.assert_array_equal(output, answered[0])
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read() if proc.stdout else ""
        assert "SIGTERM received: draining" in log and "stopped (drained)" in log
        channel.close()


def test_sigint_also_drains(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[models.lrn]\n")
    with serve_process("--config", str(config)) as (proc, target):
        with grpc.insecure_channel(target) as channel:
            assert stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.lrn]\nmax_batch_size = 'many'\n", "models.lrn.max_batch_size: expected an integer"),
        ("[server]\nport = 1\n", "server.port: unknown key"),
    ],
)
def test_bad_config_file_exits_non_zero_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_weights_file_fails_start_up(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a state dict")
    config = tmp_path / "c.toml"
    config.write_text(f"[models.cifar10_full]\nweights = '{weights}'\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrnserve.client.cli",
            "serve",
            "--config",
            str(config),
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
            "--plaintext",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "not a readable PyTorch state dict" in result.stderr


def test_port_zero_logs_the_bound_port(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[models.lrn]\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrnserve.client.cli",
            "serve",
            "--plaintext",
            "--config",
            str(config),
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",  # never the default 8002, which another process on the machine may hold
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "gRPC listening on 127.0.0.1:" in line:
                port = int(line.split("127.0.0.1:")[1].split()[0])
        assert port and port > 0
        wait_ready(f"127.0.0.1:{port}", None, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        if proc.stdout:
            proc.stdout.close()
