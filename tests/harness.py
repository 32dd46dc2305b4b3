"""Test helpers: a real server on 127.0.0.1:0 in a background thread, and wire helpers.

The server runs its own asyncio loop in a thread, exactly as ``lrnserve serve``
runs it, and tests talk to it over a real gRPC channel. Requests are built with
the generated stubs directly, so these helpers test the wire, not the SDK.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
import torch

from lrnserve.client._tensors import set_parameter
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from lrnserve.client.pb import health_pb2, health_pb2_grpc
from lrnserve.server import eventloop
from lrnserve.server.app import LrnServer
from lrnserve.server.ops import native
from lrnserve.server.repository import ServableFactory
from lrnserve.server.servables import LRNServable, Servable, create_servable
from lrnserve.server.settings import BatchingPolicy, ModelConfig, ServerSettings
from lrnserve.server.work import Abandonment

T = TypeVar("T")
WIRE = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64", np.dtype("float16"): "FP16"}
BIG = 512 * 1024 * 1024


def settings(*models: ModelConfig, **server: Any) -> ServerSettings:
    base = ServerSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=0, grace_seconds=5.0, plaintext=True, models=models
    )
    return replace(base, **server)


def lrn_model(name: str = "lrn", **batching: int) -> ModelConfig:
    return ModelConfig(name=name, kind="lrn", batching=BatchingPolicy(**batching))


class ServerThread:
    """An in-process LrnServer on its own event loop thread; ``servables`` makes its models
    (default: the server's own factory)."""

    def __init__(self, server_settings: ServerSettings, servables: ServableFactory = create_servable) -> None:
        self.server = LrnServer(server_settings, servables=servables)
        self.loop = eventloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start(), timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 5.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop(grace), timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.target,
            options=[("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)],
        )


def infer_request(
    model: str,
    x: np.ndarray | torch.Tensor,
    parameters: Mapping[str, bool | int | float | str] | None = None,
    name: str = "input",
    raw: bool = True,
) -> pb.ModelInferRequest:
    if isinstance(x, torch.Tensor):
        datatype = {torch.bfloat16: "BF16"}.get(x.dtype) or WIRE[np.dtype(str(x.dtype).removeprefix("torch."))]
        data = x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        shape = list(x.shape)
    else:
        datatype, data, shape = WIRE[x.dtype], np.ascontiguousarray(x).tobytes(), list(x.shape)
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(data)
    else:
        assert isinstance(x, np.ndarray)
        field = {"FP32": "fp32_contents", "FP64": "fp64_contents"}[datatype]
        getattr(tensor.contents, field).extend(x.reshape(-1).tolist())
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters[key], key, value)
    return request


def output_array(response: pb.ModelInferResponse) -> np.ndarray:
    out = response.outputs[0]
    raw = response.raw_output_contents[0]
    if out.datatype == "BF16":
        bits = torch.frombuffer(bytearray(raw), dtype=torch.int16)
        return bits.view(torch.bfloat16).float().numpy().reshape(tuple(out.shape))
    dtype = {v: k for k, v in WIRE.items()}[out.datatype]
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(out.shape))


def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_process(
    *args: str, env: Mapping[str, str] | None = None, ready_timeout: float = 120, metrics_port: int = 0
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``lrnserve serve ARGS`` as a child process on free loopback ports; yields (process, target)."""
    port = free_port()
    command = [sys.executable, "-m", "lrnserve.client.cli", "serve", "--host", "127.0.0.1", "--plaintext"]
    command += ["--grpc-port", str(port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(
        [*command, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_ready(target, proc, ready_timeout)
        yield proc, target
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


def wait_ready(target: str, proc: subprocess.Popen[str] | None, timeout: float) -> None:
    """Until the server's overall health is SERVING (health needs no token, unlike ServerReady)."""
    deadline = time.monotonic() + timeout
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                raise RuntimeError(f"server exited with {proc.returncode}:\n{output}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} not ready after {timeout}s")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def scrape(port: int) -> str:
    """The Prometheus text exposition of a server's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, or None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


class GatedLRN(LRNServable):
    """The LRN model, but each batch waits for ``gate`` and is recorded (FP32 requests); it
    fails batches of the modes in ``fail_modes``, or every batch with ``failure`` when set."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batches: list[list[float]] = []  # per batch: the fill value of each sample
        self.fail_modes: set[str] = set()
        self.failure: Exception | None = None

    def cheap(self, shape: tuple[int, ...], group: Hashable) -> bool:
        return False  # a batch waits for the gate: never on the event loop thread

    def _enter(self, group: object, first_values: list[float]) -> None:
        self.started.set()
        assert self.gate.wait(timeout=30), "test gate never opened"
        self.batches.append(first_values)
        if self.failure is not None:
            # A fresh copy each time: a raised exception keeps its traceback, and the test's own
            # object would keep every frame of the batch (and its calls) alive.
            raise copy.copy(self.failure)
        mode, _ = group  # type: ignore[misc]
        if mode in self.fail_modes:
            raise RuntimeError(f"model failure in mode {mode}")

    def run(
        self,
        group: object,
        x: torch.Tensor,
        scalars: Mapping[str, torch.Tensor],
        abandonment: Abandonment | None = None,
    ) -> torch.Tensor:
        self._enter(group, [float(sample.reshape(-1)[0]) for sample in x])
        return super().run(group, x, scalars, abandonment)

    def run_raw(
        self,
        group: Hashable,
        parts: Sequence[np.ndarray],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        scalars: Mapping[str, np.ndarray],
    ) -> np.ndarray | None:
        if self._kernel is None:  # the executor falls back to run(), which enters the gate
            return None
        samples = np.concatenate(parts).view(np.float32).reshape(shape[0], -1)
        self._enter(group, [float(sample[0]) for sample in samples])
        return super().run_raw(group, parts, shape, dtype, scalars)


class Probes:
    """A servable factory for the server: LRN models become ``probe`` (a GatedLRN), the rest are
    the server's own; ``probes[name]`` is the servable made for a model."""

    def __init__(self, probe: type[GatedLRN] = GatedLRN) -> None:
        self.probe = probe
        self.made: dict[str, Servable] = {}

    def __call__(self, config: ModelConfig) -> Servable:
        servable = self.probe(config) if config.kind == "lrn" else create_servable(config)
        self.made[config.name] = servable
        return servable

    def __getitem__(self, name: str) -> GatedLRN:
        servable = self.made[name]
        assert isinstance(servable, GatedLRN)
        return servable


def gated_server(server_settings: ServerSettings, probe: type[GatedLRN] = GatedLRN) -> tuple[ServerThread, Probes]:
    """A server whose LRN models are gated probes (not started: use it as a context manager)."""
    probes = Probes(probe)
    return ServerThread(server_settings, servables=probes), probes


# ---- synchronisation helpers: bounded waits on a condition, threads whose failures are seen ----


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.005)


def join_all(threads: Iterable[threading.Thread], timeout: float = 60.0) -> None:
    """Join every thread within ``timeout`` seconds in all; fail naming those still running."""
    threads = list(threads)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread.name for thread in threads if thread.is_alive()]
    assert not alive, f"threads still running after {timeout:g}s: {alive}"


class Worker(Generic[T]):
    """``fn(*args)`` on its own thread, started at once; ``result()`` joins it (bounded) and
    returns its value or raises its exception in the caller's thread."""

    def __init__(self, fn: Callable[..., T], *args: object) -> None:
        self._fn, self._args = fn, args
        self._value: T | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"worker-{getattr(fn, '__name__', 'fn')}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float = 30.0) -> T:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} still running after {timeout:g}s"
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def requests_counted(port: int, model: str, code: str) -> float:
    """``lrnserve_requests_total{model, code}`` as scraped now (0 before the first such request)."""
    value = metric_value(scrape(port), "lrnserve_requests_total", model=model, code=code)
    return 0.0 if value is None else value


def other_build(target: str | None, folder: Path) -> native.NativeKernel:
    """The native library built for ``target`` (an x86-64 level, or None: the compiler's default)
    into ``folder`` and loaded; skips the test where this CPU cannot run that code. The loaded
    build is this CPU's best level; the others use other vector widths and tiles."""
    import pytest

    if target is not None and (native.isa_level() or "") < target:
        pytest.skip(f"this CPU does not run {target} code")
    path = folder / "kernel.so"
    native._compile(target, path)
    return native._open(path)
