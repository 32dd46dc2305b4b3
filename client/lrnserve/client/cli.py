"""The ``lrnserve`` command. ``serve`` needs the server extra; the others only the client.

lrnserve serve [--config FILE] ...
lrnserve infer MODEL -i x.npy [-o y.npy | --top K] [-p key=value ...]
lrnserve health [--model M]            # exit 0 when SERVING: a container HEALTHCHECK
lrnserve bench MODEL --shape 1,96,55,55 --concurrency 1,8,32 --duration 10 [--stream] [--json FILE]
lrnserve inspect FILE [--prototxt P]   # needs the server extra, as convert does
lrnserve convert deploy.prototxt --weights model.caffemodel -o model.onnx
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ._client import Client
from ._config import TLS
from ._errors import LrnserveError
from ._tensors import encode
from ._types import Classification
from .allocator import DEFAULT_CACHE_BYTES, keep_freed_memory
from .datatypes import DATATYPES
from .loadgen import LoadResult, run_load

DEFAULT_TARGET = "localhost:8001"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parameter(text: str) -> tuple[str, bool | int | float | str]:
    """'key=value' with the value typed: int, float, true/false, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    value: bool | int | float | str = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for convert in (int, float):
            try:
                value = convert(raw)
                break
            except ValueError:
                continue
    return key, value


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,96,55,55, got {text!r}") from None
    if len(dims) not in (3, 4) or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected 3 or 4 positive dimensions, got {text!r}")
    return dims


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def int_at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("LRNSERVE_TARGET", DEFAULT_TARGET),
        help="server host:port or gRPC URI such as dns:///name:8001 (default $LRNSERVE_TARGET or localhost:8001)",
    )
    group.add_argument(
        "--timeout", type=positive, default=30.0, metavar="SECONDS", help="per-call deadline (default 30)"
    )
    group.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA certificate file")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    group.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    group.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the server certificate")
    group.add_argument("--token-file", metavar="FILE", help="bearer token file (default: $LRNSERVE_TOKEN, when set)")


def connection(args: argparse.Namespace) -> dict[str, Any]:
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("LRNSERVE_TOKEN")
    return {"tls": tls, "token": token or None, "timeout": args.timeout}


# ---- commands ----


def _server_main(command: str, module: str) -> Callable[[Sequence[str]], int] | None:
    """The server package's ``main`` for ``command``, or None (said on stderr) without the extra."""
    try:
        return importlib.import_module(module).main  # type: ignore[no-any-return]
    except ImportError as exc:
        print(
            f"lrnserve {command}: the server is not installed ({exc.name} is missing). "
            "Install it with: pip install 'lrnserve[server]' (see README.md for CPU/GPU torch)",
            file=sys.stderr,
        )
        return None


SERVE_SPIN_COUNT = "1000"  # libgomp's own spin count once its threads outnumber the cores


def quiet_openmp_spin() -> None:
    """Let OpenMP's idle workers sleep soon in a server, unless ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` is set. An instance's intra-op threads share the cores with the event loop
    and gRPC's threads, and libgomp's workers spin about 300,000 times after each parallel region
    while its threads do not outnumber the cores, taking CPU from them: lrn [1,96,55,55] at
    concurrency 8 served 309 req/s that way and 434 with GOMP_SPINCOUNT=1000 (bench/serve.py, on 2
    cores). In-process use of the op or the networks (with cores to itself) keeps the default.
    Takes effect only before torch, and with it libgomp, is first imported."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SERVE_SPIN_COUNT


def cmd_serve(argv: Sequence[str]) -> int:
    """Hand the arguments to the server package, which owns the ``serve`` flags."""
    quiet_openmp_spin()
    serve_main = _server_main("serve", "lrnserve.server.cli")
    return 2 if serve_main is None else serve_main(argv)


def cmd_modeltools(argv: Sequence[str]) -> int:
    """``inspect`` and ``convert`` read model files with the server's importers."""
    modeltools_main = _server_main(argv[0], "lrnserve.server.modeltools")
    return 2 if modeltools_main is None else modeltools_main(argv)


def cmd_infer(args: argparse.Namespace) -> int:
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        print(f"lrnserve infer: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    with Client(args.target, **connection(args)) as client:
        if args.top is not None:
            classes = client.classify(args.model, x, top=args.top)
            print(classes_text([classes] if np.ndim(x) == 3 else classes))
            return 0
        y = client.infer(args.model, x, **dict(args.parameter or []))
    if args.output is None:
        print(output_summary(y))
        return 0
    np.save(args.output, np.asarray(y), allow_pickle=False)
    print(f"{args.output}: {np.asarray(y).dtype} {list(np.shape(y))}")
    return 0


def classes_text(images: Sequence[Sequence[Classification]]) -> str:
    """Each image's classes, best first: score, index and label (when the model has labels)."""
    lines = []
    for i, classes in enumerate(images):
        lines.append(f"image {i}:")
        lines += [f"  {c.score:.6f}  {c.index:>6}  {c.label or ''}".rstrip() for c in classes]
    return "\n".join(lines)


def output_summary(y: Any) -> str:
    """What an answer holds, when no file is asked for: shape, dtype, and per sample its range
    and where its largest value is."""
    array = np.asarray(y, dtype=np.float64) if not isinstance(y, np.ndarray) else y
    lines = [f"output: {array.dtype} {list(array.shape)}"]
    samples = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    for i, sample in enumerate(samples):
        if sample.size:
            lines.append(f"  sample {i}: min {sample.min():.6g}  max {sample.max():.6g}  argmax {int(sample.argmax())}")
    return "\n".join(lines)


def cmd_health(args: argparse.Namespace) -> int:
    service = args.model or ""
    with Client(args.target, **connection(args), retries=0) as client:
        serving = client.health(service)
    print(f"{service or 'server'}: {'SERVING' if serving else 'NOT_SERVING'}")
    return 0 if serving else 1


def progress_bar(label: str) -> Any:
    width = 30

    def show(fraction: float, ok: int, errors: int) -> None:
        filled = int(fraction * width)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r{label} [{bar}] {fraction:4.0%}  ok {ok}  errors {errors}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def bench_table(results: list[LoadResult]) -> str:
    header = f"{'concurrency':>11}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors"
    lines = [header, "-" * len(header)]
    for r in results:
        s = r.summary()
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
        lines.append(
            f"{r.concurrency:>11}{r.throughput:>10.1f}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['p99_ms']:>9.2f}"
            f"{s['max_ms']:>9.2f}  {errors}"
        )
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    keep_freed_memory(DEFAULT_CACHE_BYTES)  # a load generator should cost the machine little
    x = np.random.default_rng(0).standard_normal(args.shape).astype(DATATYPES[args.dtype].numpy)
    request, _ = encode(args.model, x, dict(args.parameter or []))
    conn = connection(args)
    client = Client(args.target, **conn)  # the same channel settings as every other command
    credentials = client._credentials()
    metadata = client._call_metadata
    with client:
        if not client.ready(args.model):
            print(f"lrnserve bench: model {args.model!r} is not ready at {args.target}", file=sys.stderr)
            return 1
    results = []
    for concurrency in args.concurrency:
        label = f"concurrency {concurrency:>4}"
        results.append(
            run_load(
                client.target,
                request,
                concurrency,
                args.duration,
                warmup=args.warmup,
                timeout=conn["timeout"],
                progress=None if args.quiet else progress_bar(label),
                channel_options=client.options,
                credentials=credentials,
                metadata=metadata,
                stream=args.stream,
            )
        )
    how = "one ModelStreamInfer stream" if args.stream else "ModelInfer calls"
    print(f"{args.model} {list(args.shape)} {args.dtype} at {args.target} ({how}), {args.duration:g}s per concurrency")
    print(bench_table(results))
    if args.json:
        document = {
            "model": args.model,
            "shape": list(args.shape),
            "datatype": args.dtype,
            "target": args.target,
            "duration": args.duration,
            "results": [_finite(r.summary()) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


def _finite(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: latencies of a run without successes become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lrnserve",
        description="LRN inference service (Open Inference Protocol v2 over gRPC): server and client tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    # Listed for --help; main() hands everything after "serve" to the server package.
    commands.add_parser("serve", help="run the inference server (lrnserve serve --help lists its flags)")
    commands.add_parser("inspect", help="show a model file's layers and what lrnserve cannot run (needs the server)")
    commands.add_parser("convert", help="convert a Caffe model to ONNX, checked in onnxruntime (needs the server)")

    infer = commands.add_parser(
        "infer",
        help="run one inference from a .npy file",
        description="Send the array in a .npy file (NCHW, or CHW for one sample; float32, float16 or "
        "float64) to MODEL; save the answer as .npy (-o), print each image's best classes (--top), or "
        "else print a summary of the answer.",
    )
    infer.add_argument("model", metavar="MODEL", help="model name, e.g. lrn or alexnet")
    infer.add_argument("-i", "--input", required=True, metavar="X.npy", help="input array")
    answer = infer.add_mutually_exclusive_group()
    answer.add_argument(
        "-o", "--output", metavar="Y.npy", help="where to write the output (default: print a short summary of it)"
    )
    answer.add_argument(
        "--top", type=int_at_least_1, metavar="K", help="print each image's K best classes (a classifier model)"
    )
    infer.add_argument(
        "-p",
        "--parameter",
        action="append",
        type=parameter,
        metavar="KEY=VALUE",
        help="request parameter, repeatable (lrn: mode, size, alpha, beta, k)",
    )
    add_connection(infer)
    infer.set_defaults(handler=cmd_infer)

    health = commands.add_parser(
        "health",
        help="exit 0 if the server (or one model) is SERVING",
        description="grpc.health.v1 check: prints SERVING or NOT_SERVING; exit 0 only when serving "
        "(usable as a container HEALTHCHECK or probe).",
    )
    health.add_argument("--model", metavar="M", help="check this model instead of the whole server")
    add_connection(health)
    health.set_defaults(handler=cmd_health, timeout=5.0)

    bench = commands.add_parser(
        "bench",
        help="closed-loop load test",
        description="Keep CONCURRENCY requests in flight for DURATION seconds per concurrency level and "
        "report throughput, latency percentiles and errors by status code.",
    )
    bench.add_argument("model", metavar="MODEL")
    bench.add_argument("--shape", type=shape, required=True, help="input shape, e.g. 1,96,55,55")
    # numpy types only: bfloat16 has no numpy type to draw random inputs in
    bench.add_argument("--dtype", choices=[d.wire for d in DATATYPES.values() if d.numpy], default="FP32")
    bench.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="levels, e.g. 1,8,32 (default)")
    bench.add_argument("--duration", type=positive, default=10.0, metavar="SECONDS", help="per level (default 10)")
    bench.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS", help="untimed, per level (default 1)")
    bench.add_argument("-p", "--parameter", action="append", type=parameter, metavar="KEY=VALUE")
    bench.add_argument(
        "--stream", action="store_true", help="one ModelStreamInfer stream with CONCURRENCY requests outstanding"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    add_connection(bench)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:])
    if argv[:1] in (["inspect"], ["convert"]):
        return cmd_modeltools(argv)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except LrnserveError as exc:
        print(f"lrnserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
