"""Networks end to end on the CPU: lrnserve's engine against onnxruntime and torch.

For each network and batch size, four engines compute the same network on the same weights
and the same float32 inputs, with the same CPU thread count, taking turns (every repetition
times each engine once, in rotating order; medians of ``--reps``):

- ``lrnserve``: ``NetworkServable`` loaded as the server loads it and called as the executor
  calls it (``servable.run`` on an instance thread set up like ``Executor._serve``: grad off,
  its own intra-op thread count), in a process whose C heap is set up as the server's
  (``allocator_cache_bytes``, ``allocator_arenas``; every engine shares it);
- ``onnxruntime``: the same network as ONNX with ORT's own LRN (``intra_op_num_threads`` the
  same, ``inter_op_num_threads`` 1, sequential execution, all graph optimizations). A built-in's
  file is its BVLC prototxt read with the built-in's weights (written as a caffemodel) and
  written by lrnserve's exporter (``importers.export_onnx``); ZFNet has no prototxt and is
  written op by op with ``onnx.helper`` from the built-in module;
- ``torch``: torch eager, the same network with ``torch.nn.LocalResponseNorm`` (within-channel
  LRN as its avg_pool2d composition);
- ``compile``: ``torch.compile`` of ``torch`` (compiled before timing; ``--skip-compile``);
- ``unpacked`` (``--unpacked``): lrnserve's servable without its load-time preparation for the
  CPU (oneDNN prepacking, and the native chain of a small network: every layer through torch),
  i.e. the engine before them, for a before/after in one run.

Before timing, each engine's output is compared with lrnserve's at every batch size ("err":
max |out - lrnserve| / max |lrnserve - its per-sample mean|, i.e. relative to the spread of
the probabilities, since seeded random weights give nearly uniform ones).

    python bench/networks.py [--networks alexnet,caffenet,googlenet,zfnet512,cifar10_full]
        [--batches 1,8,32] [--reps 5] [--threads N] [--instances 1] [--skip-compile] [--unpacked]
        [--model-file x.onnx | --prototxt p.prototxt [--weights w.caffemodel]] [--json out.json]

``--instances N`` runs every engine as N instances side by side, each with ``threads // N``
intra-op threads (the server's own layout for networks is min(cores, 4) instances); images/s is
then the aggregate. This machine is shared and noisy: compare engines within one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lrnserve.client.allocator import keep_freed_memory, limit_arenas
from lrnserve.server.importers import read_caffe, read_onnx
from lrnserve.server.importers.export_onnx import export
from lrnserve.server.models import LRNNetwork, create_network
from lrnserve.server.models.runtime import GraphNetwork
from lrnserve.server.ops import LocalResponseNorm, LRNParams
from lrnserve.server.servables import NetworkServable
from lrnserve.server.settings import ModelConfig, ServerSettings

# The BVLC deploy prototxts: the shared model folder, else the copies the tests carry.
CAFFE_DIRS = (Path("/work/shared/models/caffe"), Path(__file__).resolve().parent.parent / "tests" / "data" / "caffe")
PROTOTXTS = {
    "alexnet": "bvlc_alexnet.deploy.prototxt",
    "caffenet": "bvlc_reference_caffenet.deploy.prototxt",
    "googlenet": "bvlc_googlenet.deploy.prototxt",
    "cifar10_full": "cifar10_full.deploy.prototxt",
}
DEFAULT_NETWORKS = ("alexnet", "caffenet", "googlenet", "zfnet512", "cifar10_full")
MIN_SAMPLE_S = 0.05  # a timed sample repeats a fast call until it lasts about this long
SETTLE_S = 0.01  # pause between engines: spinning OpenMP/ORT workers of the last one go idle

Fn = Callable[[np.ndarray], np.ndarray]


# ---- the torch reference with torch's own LRN -------------------------------------------


class WithinLRN(nn.Module):
    """Within-channel LRN as torch ops (torch has no module for it): Caffe's definition."""

    def __init__(self, p: LRNParams) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        mean = F.avg_pool2d(x * x, p.size, stride=1, padding=p.size // 2, count_include_pad=True)
        return x / (p.k + p.alpha * mean).pow(p.beta)


def torch_lrn(p: LRNParams) -> nn.Module:
    if p.mode == "across":
        return nn.LocalResponseNorm(p.size, p.alpha, p.beta, p.k)
    return WithinLRN(p)


# ---- ONNX files ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_caffemodel(network: LRNNetwork, path: Path) -> None:
    """The network's learned layers as a caffemodel (NetParameter.layer, BlobProto shape + data)."""
    layers = []
    for name, module in network.caffe_layers():
        assert isinstance(module, (nn.Conv2d, nn.Linear))
        blobs = b""
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        for tensor in params:
            array = tensor.detach().cpu().numpy().astype("<f4")
            dims = b"".join(_varint(d) for d in array.shape)
            blobs += _field(7, _field(7, _field(1, dims)) + _field(5, array.tobytes()))
        layers.append(_field(100, _field(1, name.encode()) + blobs))
    path.write_bytes(b"".join(layers))


def sequential_onnx(network: LRNNetwork) -> bytes:
    """An LRN network of Conv2d/ReLU/LRN/MaxPool2d/Dropout/Linear (features then classifier,
    softmax last) as ONNX with its LRN as ONNX LRN; ceil-mode pools as MaxPool ceil_mode."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    value = "input"
    flat = False

    def add(op: str, inputs: list[str], **attrs: Any) -> None:
        nonlocal value
        out = f"v{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(nodes)}", **attrs))
        value = out

    def weight(name: str, tensor: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(tensor.detach().cpu().numpy(), name))
        return name

    assert isinstance(network.features, nn.Sequential) and isinstance(network.classifier, nn.Sequential)
    for name, module in [*network.features.named_children(), *network.classifier.named_children()]:
        if isinstance(module, nn.Conv2d):
            assert isinstance(module.padding, tuple)
            w = weight(f"{name}.weight", module.weight)
            b = [weight(f"{name}.bias", module.bias)] if module.bias is not None else []
            add(
                "Conv",
                [value, w, *b],
                kernel_shape=list(module.kernel_size),
                strides=list(module.stride),
                pads=[*module.padding, *module.padding],
                group=module.groups,
            )
        elif isinstance(module, nn.ReLU):
            add("Relu", [value])
        elif isinstance(module, LocalResponseNorm):
            assert module.mode == "across"
            add("LRN", [value], size=module.size, alpha=module.alpha, beta=module.beta, bias=module.k)
        elif isinstance(module, nn.MaxPool2d):
            k, s, p = (module.kernel_size, module.stride, module.padding)
            assert isinstance(k, int) and isinstance(s, int) and isinstance(p, int)
            add("MaxPool", [value], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=int(module.ceil_mode))
        elif isinstance(module, nn.Dropout):
            continue
        elif isinstance(module, nn.Linear):
            if not flat:
                add("Flatten", [value], axis=1)
                flat = True
            w = weight(f"{name}.weight", module.weight)
            add("Gemm", [value, w, weight(f"{name}.bias", module.bias)], transB=1)
        else:
            raise TypeError(f"{network.name}: {name} is a {type(module).__name__}, which sequential_onnx cannot write")
    add("Softmax", [value], axis=1)
    nodes[-1].output[0] = "probabilities"
    graph = helper.make_graph(
        nodes,
        network.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *network.input_shape])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", network.num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="bench/networks.py")
    model.ir_version = 7
    return bytes(model.SerializeToString())


# ---- engines ------------------------------------------------------------------------------


@dataclass
class Subject:
    """One network: how to load lrnserve's servable, the ONNX bytes, and the torch reference."""

    label: str
    config: ModelConfig
    onnx_bytes: bytes
    reference: nn.Module  # torch eager, torch's LRN
    sample_shape: tuple[int, ...]


def built_in_subject(name: str, tmp: Path) -> Subject:
    config = ModelConfig(name=name, kind=name)
    network = create_network(name)  # the servable builds the same one: seeded, seed 0
    if name in PROTOTXTS:
        weights = tmp / f"{name}.caffemodel"
        write_caffemodel(network, weights)
        prototxt = next((d / PROTOTXTS[name] for d in CAFFE_DIRS if (d / PROTOTXTS[name]).is_file()), None)
        if prototxt is None:
            raise SystemExit(f"{PROTOTXTS[name]} is in none of {', '.join(map(str, CAFFE_DIRS))}")
        graph = read_caffe(prototxt, weights)
        onnx_bytes = export(graph)
    else:
        onnx_bytes = sequential_onnx(network)
    reference = create_network(name, lrn_layer=torch_lrn)
    return Subject(name, config, onnx_bytes, reference.eval(), network.input_shape)


def file_subject(model_file: Path | None, prototxt: Path | None, weights: Path | None) -> Subject:
    if model_file is not None:
        config = ModelConfig(name=model_file.stem, kind="onnx", path=model_file)
        graph = read_onnx(model_file)
        onnx_bytes = model_file.read_bytes()
        label = model_file.name
    else:
        assert prototxt is not None
        config = ModelConfig(name=prototxt.stem, kind="caffe", prototxt=prototxt, weights=weights)
        graph = read_caffe(prototxt, weights)
        onnx_bytes = export(graph)
        label = prototxt.name
    reference = GraphNetwork(graph, lrn_layer=torch_lrn).eval()
    return Subject(label, config, onnx_bytes, reference, reference.input_shape)


class Instances:
    """``count`` worker threads, each set up like an executor instance (grad off, ``threads``
    intra-op threads); ``run`` hands every worker the same job and waits for all."""

    def __init__(self, count: int, threads: int) -> None:
        self.count, self.threads = count, threads
        self._jobs: list[queue.SimpleQueue[Callable[[], object] | None]] = [queue.SimpleQueue() for _ in range(count)]
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._serve, args=(q,), daemon=True) for q in self._jobs]
        for worker in self._workers:
            worker.start()

    def _serve(self, jobs: queue.SimpleQueue[Callable[[], object] | None]) -> None:
        torch.set_grad_enabled(False)
        torch.get_num_threads()
        torch.set_num_threads(self.threads)
        while (job := jobs.get()) is not None:
            try:
                job()
                self._done.put(None)
            except BaseException as exc:
                self._done.put(exc)

    def run(self, jobs: list[Callable[[], object]]) -> None:
        for q, job in zip(self._jobs, jobs, strict=True):
            q.put(job)
        for _ in jobs:
            if (error := self._done.get()) is not None:
                raise error

    def call(self, job: Callable[[], object]) -> object:
        """``job`` on the first worker; its result."""
        box: list[object] = []
        self._jobs[0].put(lambda: box.append(job()))
        if (error := self._done.get()) is not None:
            raise error
        return box[0]

    def close(self) -> None:
        for q in self._jobs:
            q.put(None)
        for worker in self._workers:
            worker.join()


def ort_session(onnx_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


@dataclass
class Engines:
    """Per instance, a function per engine from an input array to the output array."""

    per_instance: list[dict[str, Fn]]
    load_s: dict[str, float] = field(default_factory=dict)


def build_engines(subject: Subject, pool: Instances, compile_: bool, unpacked: bool) -> Engines:
    load_s: dict[str, float] = {}
    start = time.perf_counter()
    servable = NetworkServable(subject.config)
    servable.threads = pool.threads
    pool.call(lambda: servable.load(torch.device("cpu")))
    load_s["lrnserve"] = time.perf_counter() - start
    plain: NetworkServable | None = None
    if unpacked:  # the engine as it was before its load-time preparation: the same servable, layer by layer
        plain = NetworkServable(subject.config)
        plain.threads = pool.threads
        plain.network.prepack_for_cpu = lambda: 0  # type: ignore[method-assign]
        pool.call(lambda: plain.load(torch.device("cpu")))
        plain.chain = None
    start = time.perf_counter()
    sessions = [ort_session(subject.onnx_bytes, pool.threads) for _ in range(pool.count)]
    load_s["onnxruntime"] = time.perf_counter() - start
    input_name = sessions[0].get_inputs()[0].name
    reference = subject.reference
    compiled: nn.Module | None = None
    if compile_:
        # Every network and batch size is a recompilation of the same forward code; past dynamo's
        # default limit (8) it silently runs eager, which would mislabel later rows.
        torch._dynamo.config.recompile_limit = 256
        start = time.perf_counter()
        compiled = torch.compile(reference, dynamic=False)  # type: ignore[assignment]
        load_s["compile"] = time.perf_counter() - start  # compiling itself happens at the first calls

    def lrnserve_fn(x: np.ndarray) -> np.ndarray:
        return servable.run((), torch.from_numpy(x), {}).numpy()

    def torch_fn(module: nn.Module) -> Fn:
        return lambda x: module(torch.from_numpy(x)).numpy()

    per_instance = []
    for session in sessions:
        fns: dict[str, Fn] = {
            "lrnserve": lrnserve_fn,
            "onnxruntime": lambda x, s=session: s.run(None, {input_name: x})[0],  # type: ignore[misc]
            "torch": torch_fn(reference),
        }
        if plain is not None:
            fns["unpacked"] = lambda x, p=plain: p.run((), torch.from_numpy(x), {}).numpy()  # type: ignore[misc]
        if compiled is not None:
            fns["compile"] = torch_fn(compiled)
        per_instance.append(fns)
    return Engines(per_instance, load_s)


# ---- measuring ----------------------------------------------------------------------------


@dataclass
class Row:
    network: str
    batch: int
    images_per_s: dict[str, float]
    error: dict[str, float]
    repeats: dict[str, int]

    @property
    def ratio(self) -> float:
        return self.images_per_s["lrnserve"] / self.images_per_s["onnxruntime"]


def spread_error(out: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.reshape(ref.shape[0], -1).astype(np.float64)
    out = out.reshape(ref.shape).astype(np.float64)
    spread = np.max(np.abs(ref - ref.mean(axis=1, keepdims=True)))
    return float(np.max(np.abs(out - ref)) / spread) if spread > 0 else float(np.max(np.abs(out - ref)))


def rotations(names: list[str], reps: int) -> Iterator[list[str]]:
    for rep in range(reps):
        shift = rep % len(names)
        yield names[shift:] + names[:shift]


def measure(subject: Subject, engines: Engines, pool: Instances, batch: int, reps: int, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((batch, *subject.sample_shape), dtype=np.float32) for _ in range(pool.count)]
    names = list(engines.per_instance[0])
    reference = pool.call(lambda: engines.per_instance[0]["lrnserve"](inputs[0]))
    assert isinstance(reference, np.ndarray)
    error: dict[str, float] = {}
    for name in names:  # also the warm-up (compile's compilation for this shape)
        out = pool.call(lambda n=name: engines.per_instance[0][n](inputs[0]))  # type: ignore[misc]
        assert isinstance(out, np.ndarray)
        error[name] = spread_error(out, reference)

    def timed(name: str, repeat: int) -> float:
        def job(i: int, repeat: int) -> Callable[[], object]:
            fn, x = engines.per_instance[i][name], inputs[i]
            return lambda: [fn(x) for _ in range(repeat)]

        # One untimed call first: the first call after another engine waits for that engine's
        # threads to stop spinning (after onnxruntime, cifar10_full's first call took 40-48 ms
        # instead of 0.6); a server runs one engine, so this switch is not part of its speed.
        pool.run([job(i, 1) for i in range(pool.count)])
        start = time.perf_counter()
        pool.run([job(i, repeat) for i in range(pool.count)])
        return time.perf_counter() - start

    repeats = {}
    for name in names:  # warm-up that also sizes a sample
        once = timed(name, 1)
        repeats[name] = max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in rotations(names, reps):
        for name in order:
            time.sleep(SETTLE_S)
            seconds = timed(name, repeats[name])
            samples[name].append(pool.count * repeats[name] * batch / seconds)
    images = {name: statistics.median(values) for name, values in samples.items()}
    return Row(subject.label, batch, images, error, repeats)


def print_table(rows: list[Row], names: list[str], header: str) -> None:
    print(header)
    line = f"{'network':14}{'batch':>6}" + "".join(f"{n + ' img/s':>18}" for n in names)
    before = "unpacked" in names
    line += f"{'lrn/ort':>9}" + (f"{'unpacked/ort':>14}" if before else "") + f"{'max err vs lrnserve':>22}"
    print(line)
    print("-" * len(line))
    for row in rows:
        text = f"{row.network:14}{row.batch:>6}"
        text += "".join(f"{row.images_per_s.get(n, math.nan):>18.1f}" for n in names)
        worst = max((v for k, v in row.error.items() if k != "lrnserve"), default=0.0)
        text += f"{row.ratio:>8.2f}x"
        if before:
            text += f"{row.images_per_s['unpacked'] / row.images_per_s['onnxruntime']:>13.2f}x"
        text += f"{worst:>22.1e}"
        print(text)
    sys.stdout.flush()


def in_own_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread that ends with it, as the server loads models (``eventloop.in_own_thread``):
    OpenMP keeps a team for every thread that computed in parallel, and one left on this main thread
    would outnumber the cores and slow every engine's parallel ops on the instance threads."""
    box: list[Any] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=body, name="bench-load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def main() -> None:
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    if device.parse_known_args()[0].device == "cuda":  # another set of engines: bench/networks_cuda.py
        import networks_cuda

        networks_cuda.main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu",), default="cpu", help="cuda: bench/networks_cuda.py")
    parser.add_argument("--networks", default=",".join(DEFAULT_NETWORKS))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads in all (default: torch's count)")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument(
        "--unpacked",
        action="store_true",
        help="also lrnserve without oneDNN prepacking and the native chain (the engine before)",
    )
    parser.add_argument("--model-file", type=Path, help="an .onnx file instead of the built-ins")
    parser.add_argument("--prototxt", type=Path, help="a Caffe deploy prototxt instead of the built-ins")
    parser.add_argument("--weights", type=Path, help="the prototxt's caffemodel (else seeded random weights)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The C heap as `lrnserve serve` sets up its own (allocator_cache_bytes, allocator_arenas), for
    # every engine of this process alike: freed activations are reused, not page-faulted anew.
    keep_freed_memory(ServerSettings().allocator_cache_bytes)
    limit_arenas(ServerSettings().allocator_arenas)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    per_instance = max(1, threads // args.instances)
    batches = [int(b) for b in args.batches.split(",")]
    pool = Instances(args.instances, per_instance)
    names = ["lrnserve", "onnxruntime", "torch"] + (["unpacked"] if args.unpacked else [])
    names += [] if args.skip_compile else ["compile"]
    header = (
        f"networks, float32, CPU ({torch.get_num_threads()} threads: {args.instances} instance(s) x {per_instance}), "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, medians of {args.reps}, alternating"
    )
    rows: list[Row] = []
    loads: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_file or args.prototxt:
            subjects: list[Callable[[], Subject]] = [lambda: file_subject(args.model_file, args.prototxt, args.weights)]
        else:
            subjects = [functools.partial(built_in_subject, n, Path(tmp)) for n in args.networks.split(",")]
        for make in subjects:
            subject, engines = in_own_thread(
                lambda make=make: (s := make(), build_engines(s, pool, not args.skip_compile, args.unpacked))
            )
            loads[subject.label] = engines.load_s
            for batch in batches:
                row = measure(subject, engines, pool, batch, args.reps, args.seed)
                rows.append(row)
                print(
                    f"  {row.network} batch {row.batch}: "
                    + ", ".join(f"{n} {row.images_per_s[n]:.1f}" for n in names)
                    + f"; err {row.error}",
                    file=sys.stderr,
                )
            del engines, subject
    print_table(rows, names, header)
    if args.json:
        payload = {
            "header": header,
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
            "load_s": loads,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    pool.close()


if __name__ == "__main__":
    main()
