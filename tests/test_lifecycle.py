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
from harness import BIG, infer_request, output_array, serve_process, stub, wait_ready

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc

CONFIG = """
[server]
grace_seconds = 60
[models.lrn]
kind = "lrn"
max_batch_size = 1
max_queue_delay_us = 0
max_queue_size = 64
"""


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path: Path) -> None:
    config = tmp_path / "drain.toml"
    config.write_text(CONFIG)
    with serve_process("--config", str(config)) as (proc, target):
        channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
        )
        x = np.random.default_rng(0).standard_normal((16, 96, 55, 55)).astype(np.float32)
        request = infer_request("lrn", x)
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(stub(channel).ModelInfer, request, timeout=120) for _ in range(24)]
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            done_before = {i for i, f in enumerate(futures) if f.done()}
            time.sleep(0.1)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                stub(channel).ModelInfer(infer_request("lrn", x[:1]), timeout=10)
            answered, turned_away = [], []
            for i, future in enumerate(futures):
                try:
                    answered.append((i, output_array(future.result(timeout=120))))
                except grpc.RpcError as exc:
                    # Only requests that reached the server after SIGTERM may be refused, and only so.
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert "shutting down" in exc.details()
                    turned_away.append(i)
        drained = [i for i, _ in answered if i not in done_before]
        assert drained, "no request was in flight at SIGTERM; the test proved nothing"
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for _, output in answered:
            assert output.shape == x.shape
            np.testing.assert_array_equal(output, answered[0][1])
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
        [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config), "--grpc-port", "0"],
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
            "--config",
            str(config),
            "--grpc-port",
            "0",
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
