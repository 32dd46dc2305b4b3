"""Drain on SIGTERM, through a real ``lrnserve serve`` process (tests/gated_serve.py) whose LRN
batches wait on a gate the test opens over stdin, and announce themselves on stdout.

With ``max_batch_size = 1`` and one instance, each request is its own batch: one computes (held
at the gate) while the others wait in the queue, so the test knows exactly what the server holds
when SIGTERM arrives.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from harness import free_port, infer_request, metric_value, output_array, scrape, stub, wait_until

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc
from lrnserve.server.cli import EXIT_DRAIN_CUT_SHORT
from lrnserve.server.ops import local_response_norm
from lrnserve.server.ops.params import LRNParams

GATED_SERVE = Path(__file__).resolve().parent / "gated_serve.py"
WAIT = 60.0  # the bound of every wait in these tests
SHAPE = (1, 4, 3, 3)
CONFIG = """
[models.lrn]
kind = "lrn"
device = "cpu"
max_batch_size = 1
instances = 1
max_queue_delay_us = 0
"""
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def sample(fill: float) -> np.ndarray:
    """An FP32 request tensor whose first value (the one the probe reports) is ``fill``."""
    x = np.random.default_rng(int(abs(fill) * 100)).standard_normal(SHAPE).astype(np.float32)
    x.flat[0] = fill
    return x


def expected(x: np.ndarray) -> np.ndarray:
    """The LRN of ``x`` with the model's (default) parameters, by the op itself."""
    p = LRNParams()
    return local_response_norm(torch.from_numpy(x.copy()), p.size, p.alpha, p.beta, p.k, p.mode).numpy()


class GatedServer:
    """A running tests/gated_serve.py: its process, a channel to it, its stdout lines (read on a
    thread into a queue) and its stderr (read on a thread, for the log)."""

    def __init__(self, proc: subprocess.Popen[str], target: str, metrics_port: int) -> None:
        self.proc = proc
        self.target = target
        self.metrics_port = metrics_port
        self.lines: queue.Queue[str | None] = queue.Queue()  # None: stdout closed
        self._log: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, name="gated-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="gated-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.channel = grpc.insecure_channel(target)
        self.stub = stub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.append(line)

    def log(self) -> str:
        return "".join(self._log)

    def next_line(self, timeout: float = WAIT) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line on the server's stdout after {timeout}s; log:\n{self.log()}") from None

    def remaining_lines(self) -> list[str]:
        """After the process exited: every line it wrote that was not read yet."""
        out: list[str] = []
        while (line := self.next_line()) is not None:
            out.append(line)
        return out

    def overall_status(self) -> int | None:
        """The grpc.health.v1 status of service "", or None while the server does not answer."""
        try:
            return int(self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)
        except grpc.RpcError:
            return None

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}; log:\n{self.log()}"
            return self.overall_status() == SERVING

        wait_until(ready, "server SERVING", WAIT)

    def wait_not_serving(self) -> None:
        """Until the overall health is NOT_SERVING, the process still running (draining)."""

        def not_serving() -> bool:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}; log:\n{self.log()}"
            return self.overall_status() == NOT_SERVING

        wait_until(not_serving, "health NOT_SERVING after SIGTERM", WAIT)

    def queue_depth(self, model: str = "lrn") -> float | None:
        return metric_value(scrape(self.metrics_port), "lrnserve_queue_depth", model=model)

    def wait_queue_depth(self, depth: int, model: str = "lrn") -> None:
        wait_until(
            lambda: self.queue_depth(model) == depth, f"lrnserve_queue_depth{{model='{model}'}} == {depth}", WAIT
        )

    def infer(self, fill: float) -> grpc.Future[pb.ModelInferResponse]:
        return self.stub.ModelInfer.future(infer_request("lrn", sample(fill)), timeout=WAIT)

    def open_gate(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("open\n")
        self.proc.stdin.flush()

    def exit_code(self) -> int:
        """Wait for the process to exit, then for its output to be read to the end."""
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running {WAIT}s after SIGTERM; log:\n{self.log()}") from None
        for reader in self._readers:
            reader.join(timeout=WAIT)
            assert not reader.is_alive(), f"{reader.name}: output not closed {WAIT}s after the process exited"
        return code

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        for reader in self._readers:
            reader.join(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextmanager
def gated_server(tmp_path: Path, *flags: str, config_text: str = CONFIG) -> Iterator[GatedServer]:
    config = tmp_path / "drain.toml"
    config.write_text(config_text)
    port = free_port()
    metrics_port = free_port()
    while metrics_port == port:
        metrics_port = free_port()
    command = [sys.executable, str(GATED_SERVE), "--plaintext", "--host", "127.0.0.1"]
    command += ["--grpc-port", str(port), "--metrics-port", str(metrics_port), "--config", str(config), *flags]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = GatedServer(proc, f"127.0.0.1:{port}", metrics_port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def hold_one_computing_and_queue(
    server: GatedServer, held: float, queued: list[float]
) -> list[grpc.Future[pb.ModelInferResponse]]:
    """``held`` computing at the gate, then each of ``queued`` behind it, in order; returns their calls."""
    calls = [server.infer(held)]
    assert server.next_line() == f"computing {held!r}"
    for depth, fill in enumerate(queued, start=1):
        calls.append(server.infer(fill))
        server.wait_queue_depth(depth)
    return calls


def test_sigterm_drains_a_request_in_compute_and_the_queued_ones(tmp_path: Path) -> None:
    fills = [-1.0, 2.0, 3.5, -4.25]
    with gated_server(tmp_path, "--grace", "60") as server:
        calls = hold_one_computing_and_queue(server, fills[0], fills[1:])
        assert server.lines.empty(), "a queued request started computing while the gate was closed"

        server.proc.send_signal(signal.SIGTERM)
        server.wait_not_serving()
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.ModelInfer(infer_request("lrn", sample(5.5)), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "shutting down" in str(refused.value.details())
        assert server.proc.poll() is None, "the server exited before its requests finished"

        server.open_gate()
        for fill, call in zip(fills, calls, strict=True):
            response: pb.ModelInferResponse = call.result(timeout=WAIT)
            np.testing.assert_array_equal(output_array(response), expected(sample(fill)))

        assert server.exit_code() == 0, server.log()
        # The queued requests ran in order after the held one; the refused one never computed.
        assert server.remaining_lines() == [f"computing {fill!r}" for fill in fills[1:]]
        log = server.log()
        assert "SIGTERM received: draining" in log
        assert "stopped (drained)" in log


def test_sigterm_drains_alexnet_requests_computing_and_queued(tmp_path: Path) -> None:
    """The drain with a real network: 24 AlexNet requests held (one computing at the gate, 23
    queued) when SIGTERM arrives are all answered, by the network, after it."""
    config = "[models.alexnet]\nmax_batch_size = 1\ninstances = 1\nmax_queue_delay_us = 0\nmax_queue_size = 64\n"
    images = np.random.default_rng(0).standard_normal((1, 3, 227, 227)).astype(np.float32)
    request = infer_request("alexnet", images)
    with gated_server(tmp_path, "--grace", "60", config_text=config) as server:
        calls = [server.stub.ModelInfer.future(request, timeout=WAIT)]
        assert server.next_line() == f"computing {float(images.flat[0])!r}"
        calls += [server.stub.ModelInfer.future(request, timeout=WAIT) for _ in range(23)]
        server.wait_queue_depth(23, model="alexnet")
        watch = server.health.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT)
        assert next(watch).status == SERVING

        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING, "a health watcher hears of the drain"
        server.wait_not_serving()
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.ModelInfer(request, timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "shutting down" in str(refused.value.details())

        server.open_gate()
        answers = [output_array(call.result(timeout=WAIT)) for call in calls]
        assert server.exit_code() == 0, server.log()
        assert answers[0].shape == (1, 1000)
        assert np.isfinite(answers[0]).all() and abs(float(answers[0].sum()) - 1.0) < 1e-4  # softmax output
        for answer in answers[1:]:
            np.testing.assert_array_equal(answer, answers[0])
        assert len(server.remaining_lines()) == 23, "the 23 queued requests each computed once, after SIGTERM"
        log = server.log()
        assert "SIGTERM received: draining" in log and "stopped (drained)" in log


class HoldingProxy:
    """A loopback TCP proxy that forwards a client's bytes to ``target`` until ``hold_after``
    of them have passed, then holds the rest until ``release``: a request caught mid-receipt.
    Bytes from the server always flow."""

    def __init__(self, target: str, hold_after: int) -> None:
        self._target = target
        self._hold_after = hold_after
        self.forwarded = 0
        self.holding = threading.Event()
        self._released = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._sockets: list[socket.socket] = [self._listener]
        self._threads[0].start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self._listener.accept()
            host, port = self._target.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            self._sockets += [client, server]
            for source, sink, held in ((client, server, True), (server, client, False)):
                pump = threading.Thread(target=self._pump, args=(source, sink, held), daemon=True)
                self._threads.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, held: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if held and self.forwarded >= self._hold_after and not self._released.is_set():
                    self.holding.set()
                    self._released.wait(timeout=WAIT)
                sink.sendall(data)
                if held:
                    self.forwarded += len(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=10)


def test_sixteen_calls_in_compute_queued_and_still_arriving_at_sigterm_are_served(tmp_path: Path) -> None:
    """SIGTERM with 16 calls begun: one computing, eleven queued, four whose 4 MiB messages are a
    quarter received (each held by its own loopback proxy). All 16 began before the drain and are
    answered exactly; a call begun after it is refused; the server then exits 0."""
    queued = [float(i) for i in range(2, 13)]
    arriving_fills = [20.0, 21.0, 22.0, 23.0]
    with gated_server(tmp_path, "--grace", "60") as server, contextlib.ExitStack() as stack:
        proxies = [HoldingProxy(server.target, hold_after=1 << 20) for _ in arriving_fills]
        for proxy in proxies:
            stack.callback(proxy.close)
        channels = [
            grpc.insecure_channel(proxy.address, options=[("grpc.max_receive_message_length", 64 << 20)])
            for proxy in proxies
        ]
        for channel in channels:
            stack.callback(channel.close)
        calls = hold_one_computing_and_queue(server, -1.0, queued)
        bigs = [np.full((1, 16, 256, 256), fill, np.float32) for fill in arriving_fills]
        arriving = [
            stub(channel).ModelInfer.future(infer_request("lrn", big), timeout=WAIT)
            for channel, big in zip(channels, bigs, strict=True)
        ]
        for proxy in proxies:
            assert proxy.holding.wait(timeout=WAIT), "a proxy never held its message"
        wait_until(
            lambda: metric_value(scrape(server.metrics_port), "lrnserve_calls_in_progress") == 16,
            "the server began all 16 calls, the four arriving ones included",
            WAIT,
        )

        server.proc.send_signal(signal.SIGTERM)
        server.wait_not_serving()
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.ModelInfer(infer_request("lrn", sample(5.5)), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()

        for proxy in proxies:
            proxy.release()
        server.wait_queue_depth(len(queued) + len(arriving))  # the arrived requests queued behind the rest
        server.open_gate()
        for fill, call in zip([-1.0, *queued], calls, strict=True):
            np.testing.assert_array_equal(output_array(call.result(timeout=WAIT)), expected(sample(fill)))
        for big, call in zip(bigs, arriving, strict=True):
            np.testing.assert_array_equal(output_array(call.result(timeout=WAIT)), expected(big))
        assert server.exit_code() == 0, server.log()
        computed = server.remaining_lines()
        assert computed[: len(queued)] == [f"computing {fill!r}" for fill in queued]
        assert sorted(computed[len(queued) :]) == [f"computing {fill!r}" for fill in arriving_fills]


def test_grace_period_cut_short(tmp_path: Path) -> None:
    with gated_server(tmp_path, "--grace", "1") as server:
        computing, queued = hold_one_computing_and_queue(server, -1.0, [2.0])

        server.proc.send_signal(signal.SIGTERM)  # the gate never opens
        with pytest.raises(grpc.RpcError) as failed_queued:
            queued.result(timeout=WAIT)
        with pytest.raises(grpc.RpcError) as failed_computing:
            computing.result(timeout=WAIT)

        assert server.exit_code() == EXIT_DRAIN_CUT_SHORT, server.log()
        assert "ended with requests still queued or running" in server.log()
        assert failed_computing.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert server.remaining_lines() == [], "the queued request computed although the gate stayed closed"
        # The queued request is answered by its batcher when it stops ("never ran: retry
        # elsewhere"), not cut off with the connection when the port closes.
        assert failed_queued.value.code() == grpc.StatusCode.UNAVAILABLE, failed_queued.value.details()
        assert "stopped before this request ran" in str(failed_queued.value.details())


def kubernetes_termination() -> tuple[list[str], float, float]:
    """From deploy/k8s: the preStop command, terminationGracePeriodSeconds, and the configmap's
    grace_seconds."""
    deploy = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
    deployment = yaml.safe_load((deploy / "cpu" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = yaml.safe_load((deploy / "base" / "configmap.yaml").read_text())
    grace = tomllib.loads(configmap["data"]["lrnserve.toml"])["server"]["grace_seconds"]
    return container["lifecycle"]["preStop"]["exec"]["command"], float(pod["terminationGracePeriodSeconds"]), grace


def test_the_kubernetes_termination_sequence(tmp_path: Path) -> None:
    """What the kubelet does, with the manifests' numbers: run preStop (the pod leaves the
    endpoints meanwhile, but calls already routed keep coming and are served), then SIGTERM; the
    drain must end, exit 0, before terminationGracePeriodSeconds runs out."""
    pre_stop, termination_grace, grace = kubernetes_termination()
    with gated_server(tmp_path, "--grace", str(grace)) as server:
        calls = hold_one_computing_and_queue(server, -1.0, [2.0])
        started = time.monotonic()
        during_pre_stop = server.infer(3.5)  # arrives while preStop runs: not refused
        server.wait_queue_depth(2)
        subprocess.run(pre_stop, check=True, timeout=termination_grace)
        assert server.overall_status() == SERVING, "the server drained before SIGTERM"
        server.proc.send_signal(signal.SIGTERM)
        server.wait_not_serving()
        server.open_gate()
        for fill, call in zip([-1.0, 2.0, 3.5], [*calls, during_pre_stop], strict=True):
            np.testing.assert_array_equal(output_array(call.result(timeout=WAIT)), expected(sample(fill)))
        assert server.exit_code() == 0, server.log()
        assert time.monotonic() - started < termination_grace, "the kubelet would have killed the pod"
