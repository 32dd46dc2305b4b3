"""Serving benchmark: lrnserve over gRPC with and without dynamic batching, against the ceiling.

Starts ``lrnserve serve`` on loopback with the default batching policy
(max_batch_size 32, adaptive max_queue_delay_us) and, beside it, with
max_batch_size 1, and drives closed-loop load with lrnserve's own load
generator (``lrnserve.client.loadgen``, the engine of ``lrnserve bench``) at
each concurrency, on both servers back to back, ``--reps`` times in alternating
order; the table shows medians over the repetitions (this machine is shared
and noisy). The ceiling is the same model
called in-process, in a child process set up like the server (same allocator
setting), at the batch sizes the batcher actually formed (read from the
ModelStatistics RPC). A last pass compares the batching server with
Prometheus metrics on and off.

    python bench/serve.py [--duration 5] [--reps 3] [--concurrency 1,8,16,32] [--cases lrn96,lrn16,alexnet]
        [--device cpu|cuda]

``--device cuda`` serves the models on the GPU; the ceiling then includes the host-to-device and
device-to-host copies of each batch, as the executor makes them.

The baseline the issue names, Seldon's MLServer with adaptive batching serving
torch's stock LRN, runs beside them in the same repetitions for the lrn cases
(set it up once with ``bash bench/mlserver_baseline/setup.sh``; ``--no-mlserver``
skips it), and so does the transport's limit: bench/grpc_echo.py, which answers
without reading the request (``--no-echo`` skips it). ``--stream`` adds the batching server
loaded over one ModelStreamInfer stream (``concurrency`` requests outstanding on it);
``--shared-memory`` the batching server (``--allow-shared-memory``) loaded through system shared
memory, each caller with its own input and output regions (inputs written once, not per call);
``--baseline-tree PATH`` the batching server running another checkout's code, for a before/after
of a change in one run; ``--no-unbatched`` skips the max_batch_size = 1 server.

BENCH_DELAY_US=N overrides max_queue_delay_us of the batching server;
--instances/--threads set the models' instance layout (default: the server's
choice, e.g. AlexNet as min(cores, 4) instances sharing the cores). The ceiling
runs the model in-process with the same layout: as many threads as instances
(at most one per request in flight), each with that many intra-op threads,
computing batches side by side.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import grpc
import numpy as np
import torch
from mlserver_baseline.server import mlserver

from lrnserve.client._same_host import answer_bytes
from lrnserve.client._types import ModelMetadata
from lrnserve.client.allocator import DEFAULT_CACHE_BYTES, keep_freed_memory
from lrnserve.client.loadgen import LoadResult, run_load
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from lrnserve.server.executor import instance_layout
from lrnserve.server.models import create_network
from lrnserve.server.ops import local_response_norm
from lrnserve.server.servables import Servable, create_servable
from lrnserve.server.settings import ModelConfig


@dataclass(frozen=True)
class Case:
    key: str
    model: str
    shape: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return f"{self.model} {list(self.shape)}"


CASES = {
    c.key: c
    for c in (
        Case("lrn96", "lrn", (1, 96, 55, 55)),
        Case("lrn16", "lrn", (1, 16, 8, 8)),
        Case("alexnet", "alexnet", (1, 3, 227, 227)),
    )
}


DELAY_US = os.environ.get("BENCH_DELAY_US")


DEVICE = "cpu"  # --device: where the served models (and the ceiling) run


@functools.cache
def _resolved_layout(model: str, instances: int, threads: int) -> tuple[int, int]:
    servable = create_servable(ModelConfig(name=model, kind=model))
    return instance_layout(servable, torch.device(DEVICE), instances, threads)


@dataclass(frozen=True)
class Layout:
    """Instances per model and CPU threads per instance as configured (0: the server chooses)."""

    instances: int = 0
    threads: int = 0

    def resolved(self, case: Case) -> tuple[int, int]:
        """What the server runs for ``case``'s model on this machine's CPU."""
        return _resolved_layout(case.model, self.instances, self.threads)


LAYOUT = Layout()


def config_text(max_batch_size: int) -> str:
    delay = f"max_queue_delay_us = {int(DELAY_US)}\n" if DELAY_US is not None else ""
    layout = f'instances = {LAYOUT.instances}\nthreads = {LAYOUT.threads}\ndevice = "{DEVICE}"\n'
    return "\n".join(
        f"[models.{name}]\nmax_batch_size = {max_batch_size}\n{delay}{layout}max_queue_size = 1024\n"
        for name in ("lrn", "alexnet")
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER_PIDS: dict[str, int] = {}  # target -> process id of the server answering there (profilers)


@contextmanager
def server(
    max_batch_size: int, metrics: bool = True, shared_memory: bool = False, tree: Path | None = None
) -> Iterator[str]:
    """``lrnserve serve`` on loopback; ``tree``: the code of another checkout (its server/ and
    client/ first on the child's path), e.g. the commit before a change, for a before/after."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(config_text(max_batch_size))
        port = free_port()
        command = [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config), "--plaintext"]
        command += ["--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0", "--log-level", "warning"]
        if not metrics:
            command.append("--no-metrics")
        if shared_memory:
            command.append("--allow-shared-memory")
        env = os.environ.copy()
        if tree is not None:
            paths = [str(tree / "server"), str(tree / "client"), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        proc = subprocess.Popen(command, env=env)
        target = f"127.0.0.1:{port}"
        SERVER_PIDS[target] = proc.pid
        try:
            with grpc.insecure_channel(target) as channel:
                client = pb_grpc.GRPCInferenceServiceStub(channel)
                deadline = time.monotonic() + 180
                while True:
                    try:
                        if client.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                            break
                    except grpc.RpcError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("server did not start")
                    time.sleep(0.2)
            yield target
        finally:
            SERVER_PIDS.pop(target, None)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


@contextmanager
def echo_server() -> Iterator[str]:
    """bench/grpc_echo.py in a child process: the most any grpc.aio server answers here."""
    script = Path(__file__).resolve().parent / "grpc_echo.py"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    target = ""
    try:
        assert proc.stdout is not None
        target = f"127.0.0.1:{int(proc.stdout.readline())}"
        SERVER_PIDS[target] = proc.pid
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield target
    finally:
        SERVER_PIDS.pop(target, None)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def request_for(case: Case) -> pb.ModelInferRequest:
    x = np.random.default_rng(0).standard_normal(case.shape).astype(np.float32)
    request = pb.ModelInferRequest(model_name=case.model)
    request.inputs.add(name="input", datatype="FP32", shape=list(case.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


@contextmanager
def shared_memory_requests(target: str, case: Case, callers: int) -> Iterator[list[pb.ModelInferRequest]]:
    """One request per caller, each naming its own input and output regions (POSIX shared memory,
    registered with the server, as tritonclient's helpers and the SDK's same-host mode make
    them): the input written once, the answer written by the server into the output region."""
    from multiprocessing import shared_memory as posix

    x = np.random.default_rng(0).standard_normal(case.shape).astype(np.float32)
    with grpc.insecure_channel(target) as channel:
        client = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = client.ModelMetadata(pb.ModelMetadataRequest(name=case.model), timeout=10)
        output_name = metadata.outputs[0].name
        # The SDK's same-host mode sizes its answer region this way too.
        out_bytes = answer_bytes(ModelMetadata.from_proto(metadata), case.shape, "FP32")
        segments: list[posix.SharedMemory] = []
        try:
            requests = []
            for caller in range(callers):
                regions = []
                for role, nbytes in (("in", x.nbytes), ("out", out_bytes)):
                    segment = posix.SharedMemory(create=True, size=nbytes)
                    segments.append(segment)
                    name = f"bench_{caller}_{role}_{segment.name}"
                    client.SystemSharedMemoryRegister(
                        pb.SystemSharedMemoryRegisterRequest(name=name, key=f"/{segment.name}", byte_size=nbytes),
                        timeout=10,
                    )
                    regions.append((name, nbytes))
                segments[-2].buf[: x.nbytes] = x.tobytes()
                request = pb.ModelInferRequest(model_name=case.model)
                tensor = request.inputs.add(name="input", datatype="FP32", shape=list(case.shape))
                output = request.outputs.add(name=output_name)
                for target_params, (name, nbytes) in ((tensor.parameters, regions[0]), (output.parameters, regions[1])):
                    target_params["shared_memory_region"].string_param = name
                    target_params["shared_memory_byte_size"].int64_param = nbytes
                requests.append(request)
            yield requests
        finally:
            client.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=10)  # all
            for segment in segments:
                segment.close()
                segment.unlink()


def batch_counts(target: str, model: str) -> dict[int, int]:
    with grpc.insecure_channel(target) as channel:
        client = pb_grpc.GRPCInferenceServiceStub(channel)
        (stats,) = client.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def mean_batch(batches: dict[int, int]) -> float:
    n = sum(batches.values())
    return sum(size * count for size, count in batches.items()) / n if n else 0.0


@dataclass
class Cell:
    result: LoadResult
    batches: dict[int, int]  # batch size -> executions during this run
    ceiling: float | None = None  # in-process samples/s at those batch sizes, measured right after

    @property
    def mean_batch(self) -> float:
        return mean_batch(self.batches)


@dataclass(frozen=True)
class Variant:
    label: str
    max_batch_size: int
    metrics: bool = True
    # lrnserve; "mlserver": MLServer serving torch's stock LRN; "echo": bench/grpc_echo.py (both lrn only)
    kind: str = "lrnserve"
    stream: bool = False  # the load over one ModelStreamInfer stream instead of ModelInfer calls
    shared_memory: bool = False  # tensors through system shared memory (a region pair per caller)
    tree: Path | None = None  # another checkout's code (``server``)

    @property
    def baseline(self) -> bool:
        return self.kind != "lrnserve"

    def serves(self, case: Case) -> bool:
        return not self.baseline or case.model == "lrn"

    def start(self, stack: ExitStack) -> str:
        if self.kind == "mlserver":
            return stack.enter_context(mlserver())
        if self.kind == "echo":
            return stack.enter_context(echo_server())
        return stack.enter_context(server(self.max_batch_size, self.metrics, self.shared_memory, self.tree))


BATCHED = Variant("batched", 32)
UNBATCHED = Variant("unbatched", 1)
METRICS_OFF = Variant("batched, metrics off", 32, metrics=False)
MLSERVER = Variant("MLServer", 32, kind="mlserver")
ECHO = Variant("gRPC echo", 0, kind="echo")
STREAMED = Variant("batched, one stream", 32, stream=True)
SHARED_MEMORY = Variant("batched, shared memory", 32, shared_memory=True)

Runs = dict[Variant, dict[tuple[str, int], list["Cell"]]]


def measure_cell(target: str, variant: Variant, case: Case, concurrency: int, duration: float) -> Cell:
    counts = (lambda: {}) if variant.baseline else (lambda: batch_counts(target, case.model))  # baselines: unknown
    before = counts()
    with ExitStack() as regions:
        requests = (
            regions.enter_context(shared_memory_requests(target, case, concurrency))
            if variant.shared_memory
            else [request_for(case)]
        )
        result = run_load(target, requests, concurrency, duration, warmup=1.0, stream=variant.stream)
    after = counts()
    formed = {size: after[size] - before.get(size, 0) for size in after if after[size] > before.get(size, 0)}
    cell = Cell(result, formed)
    print(
        f"  {variant.label:21} {case.label:24} c={concurrency:<3} {result.throughput:9.1f}/s  "
        f"p50 {result.latency(50) * 1e3:7.2f} ms  mean batch {cell.mean_batch:5.1f}  errors {dict(result.errors)}",
        flush=True,
    )
    return cell


def measure(
    variants: list[Variant],
    cases: list[Case],
    concurrencies: list[int],
    duration: float,
    reps: int,
    ceilings: Pool | None = None,
) -> Runs:
    """Every variant's server runs at once (idle but for the one under load); each cell is measured
    on every variant back to back, in alternating order, so slow drifts of this shared machine
    fall on all variants alike. With ``ceilings`` (a child set up like the server) each batching
    cell's ceiling is measured right after it, for the same reason."""
    runs: Runs = {variant: {} for variant in variants}
    for rep in range(reps):
        with ExitStack() as stack:
            targets = {v: v.start(stack) for v in variants}
            for case in cases:
                for concurrency in concurrencies:
                    order = variants if rep % 2 == 0 else variants[::-1]
                    for variant in (v for v in order if v.serves(case)):
                        cell = measure_cell(targets[variant], variant, case, concurrency, duration)
                        if ceilings is not None and variant == BATCHED:
                            instances, threads = LAYOUT.resolved(case)
                            busy = min(instances, concurrency)  # fewer requests than instances leave some idle
                            cell.ceiling = float(ceilings.apply(ceiling, (case, cell.batches, busy, threads)))
                        runs[variant].setdefault((case.key, concurrency), []).append(cell)
    return runs


def in_process_seconds(case: Case, batch: int, instances: int, threads: int, reps: int = 15) -> float:
    """Seconds per batch of ``batch`` samples of the model itself, run as the server runs it:
    ``instances`` threads side by side, each with ``threads`` intra-op threads. One instance: the
    median of ``reps`` timed calls; several: the median over rounds in which each computes a few."""
    x = torch.randn(batch, *case.shape[1:])
    if case.model == "lrn":
        fn = lambda: local_response_norm(x, 5)  # noqa: E731
    else:
        # The servable as the server loads it (prepacked layers, native kernels), not the bare
        # module: the bare AlexNet made served/ceiling read 115-128 %.
        servable = SERVABLES.get(case.model)
        if servable is None:
            servable = SERVABLES[case.model] = create_servable(ModelConfig(name=case.model, kind=case.model))
            servable.threads = threads
            servable.load(torch.device("cpu"))
        fn = lambda: servable.run((), x, {})  # noqa: E731
    if DEVICE == "cuda":  # as the executor runs a batch: host to device, compute, device to host
        device = torch.device("cuda")
        host, answer = x.pin_memory(), None
        if case.model == "lrn":
            compute = lambda g: local_response_norm(g, 5)  # noqa: E731
        else:
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = False
            gpu_net = NETWORKS.setdefault(f"{case.model}@cuda", create_network(case.model).to(device).eval())
            compute = gpu_net

        def fn() -> None:
            nonlocal answer
            y = compute(host.to(device, non_blocking=True))
            answer = torch.empty(y.shape, dtype=y.dtype, pin_memory=True) if answer is None else answer
            answer.copy_(y, non_blocking=True)
            torch.cuda.synchronize()

    def own_threads() -> None:
        torch.get_num_threads()  # torch sets a thread's pool up on first use; then ours
        torch.set_num_threads(threads)

    if instances == 1:
        own_threads()
        with torch.inference_mode():
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    rounds, per_round = 5, 3
    start_line = threading.Barrier(instances + 1)
    end_line = threading.Barrier(instances + 1)

    def instance() -> None:
        own_threads()
        with torch.inference_mode():
            fn()  # warm-up
            for _ in range(rounds):
                start_line.wait()
                for _ in range(per_round):
                    fn()
                end_line.wait()

    workers = [threading.Thread(target=instance) for _ in range(instances)]
    for worker in workers:
        worker.start()
    times = []
    for _ in range(rounds):
        start_line.wait()
        start = time.perf_counter()
        end_line.wait()
        times.append((time.perf_counter() - start) / (instances * per_round))
    for worker in workers:
        worker.join()
    return statistics.median(times)


NETWORKS: dict[str, torch.nn.Module] = {}  # on CUDA
SERVABLES: dict[str, Servable] = {}  # on the CPU


def ceiling(case: Case, batches: dict[int, int], instances: int, threads: int) -> float:
    """Samples/s of the in-process model running exactly the batches the server ran, with the
    server's instance layout."""
    samples = sum(size * count for size, count in batches.items())
    seconds = sum(count * in_process_seconds(case, size, instances, threads) for size, count in batches.items())
    return samples / seconds if seconds else float("nan")


@dataclass
class Summary:
    """One cell over the repetitions: medians, and the batches formed in all of them."""

    throughputs: list[float]
    p50s: list[float]
    p99s: list[float]
    batches: dict[int, int]
    ceilings: list[float]

    @classmethod
    def of(cls, cells: list[Cell]) -> Summary:
        batches: dict[int, int] = {}
        for cell in cells:
            for size, count in cell.batches.items():
                batches[size] = batches.get(size, 0) + count
        return cls(
            [c.result.throughput for c in cells],
            [c.result.latency(50) * 1e3 for c in cells],
            [c.result.latency(99) * 1e3 for c in cells],
            batches,
            [c.ceiling for c in cells if c.ceiling is not None],
        )

    @property
    def throughput(self) -> float:
        return statistics.median(self.throughputs)

    @property
    def mean_batch(self) -> float:
        return mean_batch(self.batches)

    @property
    def ceiling(self) -> float:
        return statistics.median(self.ceilings) if self.ceilings else math.nan

    @property
    def served_fraction(self) -> float:
        """Median over repetitions of served throughput / that repetition's ceiling."""
        if not self.ceilings:
            return math.nan
        return statistics.median(t / c for t, c in zip(self.throughputs, self.ceilings, strict=True))

    def latency_text(self) -> str:
        return f"{statistics.median(self.p50s):8.2f}{statistics.median(self.p99s):8.2f}"


def _set_up_child(cache_bytes: int, device: str) -> None:
    global DEVICE
    DEVICE = device
    keep_freed_memory(cache_bytes)


def ceiling_child() -> Pool:
    """A child process whose C heap is set up as ``lrnserve serve`` sets up its own."""
    context = multiprocessing.get_context("spawn")
    return context.Pool(1, initializer=_set_up_child, initargs=(DEFAULT_CACHE_BYTES, DEVICE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--reps", type=int, default=3, help="alternating batched/unbatched runs (default 3)")
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--cases", default=",".join(CASES), help=f"subset of {', '.join(CASES)}")
    parser.add_argument("--skip-metrics-overhead", action="store_true")
    parser.add_argument("--overhead-reps", type=int, default=3, help="alternating on/off runs (default 3)")
    parser.add_argument("--instances", type=int, default=0, help="instances per model (default 0: server's choice)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per instance (default 0: server's choice)")
    parser.add_argument(
        "--no-mlserver", action="store_true", help="skip the MLServer baseline (bench/mlserver_baseline/setup.sh)"
    )
    parser.add_argument("--no-echo", action="store_true", help="skip the gRPC echo limit (bench/grpc_echo.py)")
    parser.add_argument(
        "--stream", action="store_true", help="also the batching server loaded over one ModelStreamInfer stream"
    )
    parser.add_argument(
        "--shared-memory", action="store_true", help="also the batching server loaded through system shared memory"
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also the batching server running another checkout's code (e.g. the commit before a change)",
    )
    parser.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size = 1 server")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the models run (cuda: no MLServer baseline)"
    )
    args = parser.parse_args()
    global LAYOUT, DEVICE
    LAYOUT = Layout(args.instances, args.threads)
    DEVICE = args.device
    if DEVICE == "cuda":
        args.no_mlserver = True
    cases = [CASES[key] for key in args.cases.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    keep_freed_memory(DEFAULT_CACHE_BYTES)  # the load generator, set up as `lrnserve bench` sets itself up

    gpu = f", {torch.cuda.get_device_name()}" if DEVICE == "cuda" else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs{gpu}; server and client share this machine")
    for case in cases:
        instances, threads = LAYOUT.resolved(case)
        print(f"  {case.model}: {instances} instance(s) x {threads} CPU thread(s)")
    variants = [BATCHED] + ([] if args.no_unbatched else [UNBATCHED])
    variants += ([] if args.no_mlserver else [MLSERVER]) + ([] if args.no_echo else [ECHO])
    extra = [SHARED_MEMORY] if args.shared_memory else []
    if args.baseline_tree:
        extra.append(Variant(f"batched, {args.baseline_tree.name}", 32, tree=args.baseline_tree.resolve()))
    variants += extra
    variants += [STREAMED] if args.stream else []
    with ceiling_child() as child:
        runs = measure(variants, cases, concurrencies, args.duration, args.reps, ceilings=child)
    batched = {key: Summary.of(cells) for key, cells in runs[BATCHED].items()}
    unbatched = {key: Summary.of(cells) for key, cells in runs.get(UNBATCHED, {}).items()}
    baseline = {key: Summary.of(cells) for key, cells in runs.get(MLSERVER, {}).items()}
    echo = {key: Summary.of(cells) for key, cells in runs.get(ECHO, {}).items()}
    streamed = {key: Summary.of(cells) for key, cells in runs.get(STREAMED, {}).items()}
    overhead: dict[str, tuple[float, float]] = {}
    if not args.skip_metrics_overhead:
        top = max(concurrencies)
        onoff = measure([BATCHED, METRICS_OFF], cases, [top], args.duration, args.overhead_reps)
        for case in cases:
            on = Summary.of(onoff[BATCHED][(case.key, top)]).throughput
            off = Summary.of(onoff[METRICS_OFF][(case.key, top)]).throughput
            overhead[case.label] = (on, off)

    print(f"\nthroughput in requests/s (one sample each), latency in ms: medians of {args.reps} alternating runs;")
    print("wins = repetitions in which batching beat the unbatched run beside it; ceiling = in-process model at the")
    print("batch sizes the batcher formed, measured right after each run; served/ceil = median of the per-run ratios;")
    print("MLServer = Seldon's MLServer 1.7.1 with adaptive batching serving torch's stock LRN, in the same runs;")
    print("echo = a grpc.aio server that answers every request with a canned response of its size (bench/grpc_echo.py)")
    header = (
        f"{'case':26}{'conc':>5}{'batched/s':>11}{'p50':>8}{'p99':>8}{'unbatched/s':>13}{'p50':>8}{'p99':>8}"
        f"{'batch/unb':>10}{'wins':>6}{'mean batch':>11}{'ceiling/s':>11}{'served/ceil':>12}"
        f"{'MLServer/s':>12}{'vs MLServer':>12}{'echo/s':>9}{'of echo':>9}"
        + (f"{'stream/s':>10}{'stream/unary':>13}" if streamed else "")
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        for concurrency in concurrencies:
            b, u = batched[(case.key, concurrency)], unbatched.get((case.key, concurrency))
            m = baseline.get((case.key, concurrency))
            versus = f"{m.throughput:12.1f}{b.throughput / m.throughput:11.1f}x" if m else f"{'':24}"
            e = echo.get((case.key, concurrency))
            versus += f"{e.throughput:9.1f}{b.throughput / e.throughput:9.0%}" if e else f"{'':18}"
            st = streamed.get((case.key, concurrency))
            versus += f"{st.throughput:10.1f}{st.throughput / b.throughput:12.2f}x" if st else ""
            if u is not None:
                wins = sum(x > y for x, y in zip(b.throughputs, u.throughputs, strict=True))
                against = f"{u.throughput:13.1f}{u.latency_text()}{b.throughput / u.throughput:9.2f}x"
                against += f"{f'{wins}/{args.reps}':>6}"
            else:
                against = f"{'-':>13}{'':16}{'-':>10}{'-':>6}"
            print(
                f"{case.label:26}{concurrency:>5}{b.throughput:11.1f}{b.latency_text()}{against}"
                f"{b.mean_batch:11.1f}{b.ceiling:11.1f}{b.served_fraction:11.0%}{versus}"
            )
    if extra:
        print("\nbeside the batching server in the same runs (req/s, medians; ratio to the batching server):")
        line = f"{'case':26}{'conc':>5}{'batched/s':>11}" + "".join(f"{v.label + '/s':>34}{'ratio':>8}" for v in extra)
        print(line)
        print("-" * len(line))
        for case in cases:
            for concurrency in concurrencies:
                b = batched[(case.key, concurrency)]
                text = f"{case.label:26}{concurrency:>5}{b.throughput:11.1f}"
                for variant in extra:
                    cells = runs[variant].get((case.key, concurrency))
                    if cells:
                        other = Summary.of(cells).throughput
                        text += f"{other:34.1f}{other / b.throughput:7.2f}x"
                    else:
                        text += f"{'-':>34}{'':8}"
                print(text)
    if overhead:
        print(
            f"\nmetrics overhead at concurrency {max(concurrencies)} (batching server; medians of "
            f"{args.overhead_reps} alternating runs)"
        )
        for label, (on, off) in overhead.items():
            print(f"  {label:26} metrics on {on:9.1f}/s  off {off:9.1f}/s  on/off {on / off:6.1%}")


if __name__ == "__main__":
    main()
