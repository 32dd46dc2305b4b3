"""A flood of large requests against a real ``lrnserve serve``: resident memory stays within the
memory model (README, "Memory"), goes back down once the flood ends, and does not ratchet.

At CI's scale (a 24 GiB machine shared with the test itself): 8 callers each sending 16 MiB
tensors for 3 s, with a 160 MiB byte budget, so that most requests are refused on receipt and
two at a time are computed; three floods in a row, the callers keeping their connections. The
stricter aim, back within 10 % of the idle size after each flood, is measured and reported in
docs/reliability.md rather than asserted: on this shared machine the idle size after a flood
varies by tens of MiB from run to run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import BIG, free_port, infer_request, wait_ready

MIB = 1 << 20
CALLERS = 8
TENSOR = np.ones((1, 4, 1024, 1024), np.float32)  # 16 MiB
BUDGET = 160 * MIB  # two such requests (their message and three times their output each)
SECONDS = 3.0
ALLOCATOR_CACHE = 256 * MIB  # the server's default allocator_cache_bytes
RECEIVES = 2  # max_concurrent_receives: fewer than the callers, so that receiving waits its turn
# What HTTP/2 flow control lets a caller waiting for a receive slot send ahead (the stream
# window gRPC announces: up to 8 MiB measured on loopback).
WINDOW = 8 * MIB

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def resident(pid: int) -> tuple[int, int]:
    """(current, peak since the last reset) resident bytes of ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def flood(channels: list[grpc.Channel], request: bytes) -> Counter[str]:
    """Every caller (one connection each) sends ``request`` back to back for ``SECONDS``."""
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS
    errors: list[BaseException] = []

    def caller(channel: grpc.Channel) -> None:
        try:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            while time.monotonic() < stop:
                try:
                    call(request, timeout=60)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] += 1
        except BaseException as exc:  # collected and raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(channel,)) for channel in channels]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller never finished"
    assert not errors, errors
    return codes


def settled_resident(pid: int, within: float = 5.0) -> list[int]:
    """Resident bytes sampled every 0.25 s for ``within`` seconds after a flood."""
    samples = []
    end = time.monotonic() + within
    while time.monotonic() < end:
        samples.append(resident(pid)[0])
        time.sleep(0.25)
    return samples


def test_a_flood_of_large_requests_stays_within_the_memory_model(tmp_path: Path) -> None:
    config = tmp_path / "flood.toml"
    config.write_text('[models.lrn]\nkind = "lrn"\n')
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "LRNSERVE_MAX_INFLIGHT_BYTES": str(BUDGET),
        "LRNSERVE_MAX_MESSAGE_BYTES": str(32 * MIB),
        "LRNSERVE_MAX_CONCURRENT_RECEIVES": str(RECEIVES),
    }
    command = [sys.executable, "-m", "lrnserve.client.cli", "serve", "--plaintext", "--host", "127.0.0.1"]
    command += ["--grpc-port", str(port), "--metrics-port", str(metrics_port), "--config", str(config)]
    proc = subprocess.Popen([*command, "--log-level", "warning"], env=env)
    target = f"127.0.0.1:{port}"
    request = infer_request("lrn", TENSOR).SerializeToString()
    options = [("grpc.max_receive_message_length", BIG)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(CALLERS)]
    try:
        wait_ready(target, proc, 120)
        cold = resident(proc.pid)[0]
        report = []
        for round_ in range(3):
            before = resident(proc.pid)[0]
            reset_peak(proc.pid)
            codes = flood(channels, request)
            peak = resident(proc.pid)[1]
            after = settled_resident(proc.pid)
            settled = min(after)  # back down at some point within the 5 s
            report.append((round_, before >> 20, peak >> 20, settled >> 20, dict(codes)))
            assert codes["OK"] > 0 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
            # The memory model (README, "Memory"): the working set is the byte budget, the
            # messages being received twice each (gRPC's buffer and the received bytes), and
            # what the callers waiting for a receive slot may send ahead; the C heap may keep
            # as much again freed in other threads' arenas until the idle trim, and up to
            # allocator_cache_bytes besides.
            working_set = BUDGET + 2 * RECEIVES * len(request) + CALLERS * WINDOW
            model_bound = before + 2 * working_set + ALLOCATOR_CACHE
            assert peak <= model_bound, f"peak {peak >> 20} MiB over the model's {model_bound >> 20} MiB: {report}"
            assert peak <= before + 3 * BUDGET + 1536 * MIB, report
            # Back down within 5 s: the freed working set is given back (the idle trim), so the
            # server keeps at most one working set more than when it was cold, flood after flood.
            assert settled <= cold + working_set, f"not back below {(cold + working_set) >> 20} MiB in 5 s: {report}"
            # And near the cold size, flood after flood (no ratchet): with the threads sharing one
            # C heap (allocator_arenas), which the idle trim gives back whole. At this small scale
            # the server settled 0-12 % above its cold size (eighteen floods in six runs, 2026-12-07;
            # not pinned down: Python's traced allocations stayed flat, so it is C-level memory);
            # with two heaps 10-26 %, with glibc's 8 per core 1.7-2 x. The 10 % is met at
            # its own scale (bench/flood.py: 0 %).
            assert settled <= cold * 1.25, f"not back within 25 % of the cold {cold >> 20} MiB in 5 s: {report}"
        print("flood rounds (round, idle before MiB, peak MiB, lowest in the 5 s after MiB, codes):", report)
    finally:
        for channel in channels:
            channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
