"""``lrnserve inspect`` and ``lrnserve convert``: model-file tools for users, before serving.

``inspect`` prints what a file holds and whether lrnserve can run it (exit 1 if not);
``convert`` writes a Caffe net as ONNX and checks the file in onnxruntime, an implementation
lrnserve did not write, against lrnserve's own output. Failures are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lrnserve.client.cli import Parser

from .importers import read_caffe, read_file
from .importers.describe import report
from .importers.export_onnx import DEFAULT_OPSET, OPSETS, export
from .models import ir
from .models.runtime import GraphNetwork

TOLERANCE = 1e-4  # max |onnxruntime - lrnserve| / max |lrnserve|, float32
CHECK_BATCH = 2
CHECK_SEED = 0


def build_parser(prog: str = "lrnserve") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Model-file tools: inspect a model, convert Caffe to ONNX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    inspect = commands.add_parser(
        "inspect",
        help="show a model file's inputs, outputs, layers and what lrnserve cannot run",
        description="Print a model's inputs, outputs, every layer/node with its key parameters, the "
        "parameter count and the parts lrnserve cannot run. Exit 0 if lrnserve can run it, else 1.",
    )
    inspect.add_argument("file", type=Path, metavar="FILE", help=".onnx, .prototxt, or .caffemodel (with --prototxt)")
    inspect.add_argument("--prototxt", type=Path, metavar="P", help="the net definition of a .caffemodel")
    inspect.set_defaults(handler=cmd_inspect)
    convert = commands.add_parser(
        "convert",
        help="convert a Caffe model to ONNX, checked in onnxruntime",
        description="Write a Caffe net (deploy prototxt + caffemodel) as an ONNX file that means exactly "
        "what Caffe computes, then run it in onnxruntime (when installed) on a random batch and compare "
        f"with lrnserve's output; exit 1 if the relative error exceeds {TOLERANCE:g}.",
    )
    convert.add_argument("prototxt", type=Path, metavar="PROTOTXT", help="deploy net definition")
    convert.add_argument(
        "--weights", type=Path, metavar="CAFFEMODEL", help="trained weights (default: seeded random ones, for trying)"
    )
    convert.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.onnx", help="file to write")
    convert.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, choices=OPSETS, metavar="N", help="ONNX opset, 13 to 21 (13)"
    )
    convert.set_defaults(handler=cmd_convert)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.prototxt is not None and args.file.suffix.lower() != ".caffemodel":
        raise ir.ModelLoadError(f"{args.file}: --prototxt goes with a .caffemodel FILE")
    result = report(read_file(args.file, prototxt=args.prototxt))
    print(result.text)
    return 0 if result.runnable else 1


def cmd_convert(args: argparse.Namespace) -> int:
    if args.prototxt.suffix.lower() == ".caffemodel":
        raise ir.ModelLoadError(f"{args.prototxt}: give the net's prototxt first, the caffemodel with --weights")
    graph = read_caffe(args.prototxt, args.weights)
    if args.weights is None:
        print(f"{args.prototxt}: no --weights, so the ONNX file holds seeded random weights")
    network = GraphNetwork(graph).eval()
    data = export(graph, network, args.opset)
    args.output.write_bytes(data)
    print(
        f"wrote {args.output} ({len(data):,} bytes, ONNX opset {args.opset}): {graph.input.name} -> {graph.output.name}"
    )
    return check(args.output, network)


def check(path: Path, network: GraphNetwork) -> int:
    """Run the written file in onnxruntime and compare with lrnserve on a seeded random batch."""
    try:
        onnxruntime = importlib.import_module("onnxruntime")
    except ImportError:
        print("not verified: onnxruntime is not installed (pip install onnxruntime to check the file)")
        return 0
    rng = np.random.default_rng(CHECK_SEED)
    x = rng.standard_normal((CHECK_BATCH, *network.input_shape)).astype(np.float32)
    with torch.inference_mode():
        expected = network(torch.from_numpy(x)).numpy()
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run([network.output_name], {network.input_name: x})
    except Exception as exc:  # onnxruntime's own exception types
        raise CheckError(f"{path}: onnxruntime cannot run the written file: {ir.first_line(exc)}") from None
    if got.shape != expected.shape:
        raise CheckError(f"{path}: onnxruntime's output has shape {list(got.shape)}, lrnserve's {list(expected.shape)}")
    error = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), np.finfo(np.float32).tiny))
    verdict = "ok" if error <= TOLERANCE else f"FAILED, above {TOLERANCE:g}"
    print(
        f"checked in onnxruntime {onnxruntime.__version__} against lrnserve on a random batch of {CHECK_BATCH}: "
        f"max relative error {error:.2e} ({verdict})"
    )
    return 0 if error <= TOLERANCE else 1


class CheckError(Exception):
    """The written file does not run in onnxruntime as lrnserve runs the model."""


def main(argv: Sequence[str] | None = None, prog: str = "lrnserve") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        code: int = args.handler(args)
    except (ir.ModelLoadError, CheckError) as exc:
        print(f"{prog} {args.command}: {ir.first_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog} {args.command}: {exc.filename or ''}: {exc.strerror or ir.first_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, but still one line: users run this before anything else
        print(f"{prog} {args.command}: internal error: {type(exc).__name__}: {ir.first_line(exc)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
