"""Scale-out on one machine, as in the cluster: three replicas, client-side round robin.

Killing one replica under load costs the callers nothing (the SDK retries on another
replica), and a restarted replica takes traffic again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from harness import free_port, wait_ready, wait_until

from lrnserve.client import Client, LrnserveError, Retry

CONFIG = "[models.lrn]\nkind = 'lrn'\n"


def start_replica(port: int, config: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config), "--plaintext"]
    command += ["--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(
        command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_ready(f"127.0.0.1:{port}", None, 120)
    return proc


def successes(port: int) -> int:
    with Client(f"127.0.0.1:{port}", timeout=10) as c:
        return c.statistics("lrn").success_count


def test_kill_and_restart_a_replica_under_load(tmp_path: Path) -> None:
    config = tmp_path / "replica.toml"
    config.write_text(CONFIG)
    ports = [free_port() for _ in range(3)]
    replicas = [start_replica(port, config) for port in ports]
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    failures: list[BaseException] = []  # whatever any caller saw, asserted in the test's thread
    completed = [0]
    lock = threading.Lock()
    stop = threading.Event()
    retry = Retry(attempts=20, initial_backoff=0.02, max_backoff=0.2)

    def load() -> None:
        try:
            with Client([f"127.0.0.1:{p}" for p in ports], timeout=30, retries=retry) as client:
                while not stop.is_set():
                    try:
                        y = client.lrn(x)
                    except LrnserveError as exc:
                        with lock:
                            failures.append(exc)
                        continue
                    with lock:
                        if y.shape == x.shape:
                            completed[0] += 1
                        else:
                            failures.append(AssertionError(f"answer of shape {y.shape} for {x.shape}"))
        except BaseException as exc:  # anything else ends this caller: seen below, not lost
            with lock:
                failures.append(exc)

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        wait_until(lambda: all(successes(p) > 0 for p in ports), "round robin reached every replica")
        replicas[1].send_signal(signal.SIGKILL)
        replicas[1].wait(timeout=30)
        with lock:
            at_kill = completed[0]

        def completed_since_kill() -> int:
            with lock:
                return completed[0] - at_kill

        # A real stall blocks callers for their 30 s deadline; 10 s leaves a loaded machine room.
        wait_until(lambda: completed_since_kill() > 20, "traffic went on after a replica died", timeout=10.0)
        replicas[1] = start_replica(ports[1], config)
        # A fresh process: its counter starts at zero.
        wait_until(lambda: successes(ports[1]) > 0, "the restarted replica took traffic again", timeout=30)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
        alive = [w.name for w in workers if w.is_alive()]
        for proc in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in replicas:
            proc.wait(timeout=60)
            if proc.stderr:
                proc.stderr.close()
    assert not alive, f"load threads still running: {alive}"
    assert not failures, f"{len(failures)} callers saw errors, first: {failures[0]!r}"
    assert completed[0] > 100
