"""``lrnserve serve`` as a process: start-up errors, SIGINT, exit codes (the SIGTERM drain: test_drain.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from harness import serve_process, stub, wait_ready

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb


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
