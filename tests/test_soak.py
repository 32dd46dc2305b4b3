"""Soak and slow clients: a server under mixed valid/invalid load loses nothing and leaks little.

The soak runs LRNSERVE_SOAK_SECONDS (60 in CI; longer runs are in docs/reliability.md)
against a server process: every valid request must get its correct answer, every invalid
one its status, the server's resident memory may grow by at most RSS_BOUND_MIB after warm-up,
and nothing may be left queued or in flight at the end.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from harness import free_port, metric_value, scrape, wait_ready

from lrnserve.client import AsyncClient, Client, InvalidArgument, NotFound, Retry
from lrnserve.client.pb import health_pb2, health_pb2_grpc
from lrnserve.server.models import create_network
from lrnserve.server.ops import local_response_norm

SOAK_SECONDS = float(os.environ.get("LRNSERVE_SOAK_SECONDS", "60"))
CONCURRENCY = 48
RSS_BOUND_MIB = 64
CONFIG = """
[models.lrn]
kind = "lrn"
max_queue_size = 1024
[models.cifar10_full]
kind = "cifar10_full"
max_queue_size = 1024
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Replica:
    def __init__(self, tmp_path: Path) -> None:
        config = tmp_path / "soak.toml"
        config.write_text(CONFIG)
        self.port, self.metrics_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config), "--plaintext",
             "--host", "127.0.0.1", "--grpc-port", str(self.port), "--metrics-port", str(self.metrics_port),
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
        )  # fmt: skip
        wait_ready(self.target, None, 120)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def replica(tmp_path: Path) -> object:
    server = Replica(tmp_path)
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=30)


def test_soak_mixed_load(replica: Replica) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 16, 12, 12)).astype(np.float32) for _ in range(8)]
    params = [
        {"alpha": float(rng.uniform(0, 2)), "k": float(rng.uniform(0.5, 2)), "size": int(rng.integers(1, 8))}
        for _ in range(8)
    ]
    expected = [
        local_response_norm(torch.from_numpy(x), p["size"], p["alpha"], 0.75, p["k"]).numpy()
        for x, p in zip(inputs, params, strict=True)
    ]
    images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        probabilities = create_network("cifar10_full")(torch.from_numpy(images)).numpy()
    counts = {"ok": 0, "invalid": 0, "not_found": 0, "wrong": 0, "other": 0}
    other: list[str] = []

    async def worker(client: AsyncClient, seed: int, stop_at: float) -> None:
        local = np.random.default_rng(seed)
        while time.monotonic() < stop_at:
            kind = local.integers(0, 10)
            try:
                if kind < 6:
                    i = int(local.integers(0, 8))
                    y = await client.lrn(inputs[i], **params[i])
                    counts["ok" if np.array_equal(y, expected[i]) else "wrong"] += 1
                elif kind < 8:
                    y = await client.infer("cifar10_full", images)
                    counts["ok" if np.allclose(y, probabilities, rtol=1e-5, atol=1e-7) else "wrong"] += 1
                elif kind < 9:
                    await client.lrn(inputs[0], alpha=-1.0)
                    counts["wrong"] += 1
                else:
                    await client.infer("vgg", inputs[0])
                    counts["wrong"] += 1
            except InvalidArgument:
                counts["invalid"] += 1
            except NotFound:
                counts["not_found"] += 1
            except Exception as exc:  # anything else is a lost request
                counts["other"] += 1
                other.append(repr(exc))

    async def run(seconds: float) -> None:
        async with AsyncClient(replica.target, timeout=30, retries=Retry(attempts=1)) as client:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(worker(client, seed, stop_at) for seed in range(CONCURRENCY)))

    asyncio.run(run(min(5.0, SOAK_SECONDS / 4)))  # warm-up: allocator pools, caches
    rss_start = rss_mib(replica.proc.pid)
    for key in counts:
        counts[key] = 0
    asyncio.run(run(SOAK_SECONDS))
    rss_end = rss_mib(replica.proc.pid)
    text = scrape(replica.metrics_port)
    total = sum(counts.values())
    assert counts["wrong"] == 0 and counts["other"] == 0, (counts, other[:5])
    assert counts["ok"] > 0.5 * total and counts["invalid"] > 0 and counts["not_found"] > 0
    assert rss_end - rss_start < RSS_BOUND_MIB, (
        f"RSS grew {rss_end - rss_start:.1f} MiB ({rss_start:.0f} -> {rss_end:.0f})"
    )
    assert metric_value(text, "lrnserve_inflight_requests") == 0
    assert metric_value(text, "lrnserve_queue_depth", model="lrn") == 0
    assert metric_value(text, "lrnserve_queue_depth", model="cifar10_full") == 0
    rate = total / SOAK_SECONDS
    print(f"soak {SOAK_SECONDS:.0f}s: {counts}, {rate:.0f} req/s, RSS {rss_start:.0f} -> {rss_end:.0f} MiB")
    assert replica.stop() == 0


def test_slow_and_stalled_clients_do_not_starve_others(replica: Replica) -> None:
    # 200 connections that never finish the HTTP/2 preface, and 100 streams held open forever.
    stalled = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", replica.port), timeout=10)
        sock.sendall(b"PRI * HTTP/2.0\r\n")  # a third of the preface, then nothing
        stalled.append(sock)
    holders = []

    hold_channel = grpc.insecure_channel(replica.target)
    for _ in range(100):
        holders.append(health_pb2_grpc.HealthStub(hold_channel).Watch(health_pb2.HealthCheckRequest(), timeout=120))
    try:
        x = np.ones((1, 8, 6, 6), np.float32)
        with Client(replica.target, timeout=10) as client:
            latencies = []
            for _ in range(50):
                start = time.monotonic()
                client.lrn(x)
                latencies.append(time.monotonic() - start)
        assert max(latencies) < 1.0, f"slowest {max(latencies):.3f}s with stalled clients around"
        # The server drops connections that never complete their handshake (10 s): each stalled
        # socket gets the server's SETTINGS, later a GOAWAY, then end-of-stream.
        deadline = time.monotonic() + 20
        open_sockets = set(stalled)
        while open_sockets and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_sockets), [], [], 1.0)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    open_sockets.discard(sock)
        assert not open_sockets, f"{len(open_sockets)} of 200 stalled connections were never closed"
    finally:
        for sock in stalled:
            sock.close()
        for call in holders:
            call.cancel()
        hold_channel.close()
