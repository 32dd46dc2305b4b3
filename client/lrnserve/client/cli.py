"""The ``lrnserve`` command. ``serve`` needs the server extra; the others only the client."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    try:
        from lrnserve.server.cli import serve
    except ImportError as exc:
        print(
            f"lrnserve serve: the server is not installed ({exc.name} is missing).\n"
            "Install it with: pip install 'lrnserve[server]'  (see README.md for CPU/GPU torch)",
            file=sys.stderr,
        )
        return 2
    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrnserve",
        description="LRN inference service (Open Inference Protocol v2 over gRPC): server and client tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the inference server",
        description="Run the gRPC inference server. Without --config it serves the embedded models "
        "lrn, alexnet, caffenet, googlenet, cifar10_full and zfnet512. Settings: flags > LRNSERVE_* "
        "environment variables > config file > defaults.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config: [server] settings and [models.NAME] tables")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, metavar="PORT", help="gRPC port (default 8001; 0 = any free port)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="Prometheus metrics port (default 8002; 0 = any free port)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="do not export Prometheus metrics")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto: CUDA when available)")
    serve.add_argument("--grace", type=float, metavar="SECONDS", help="drain time on SIGTERM/SIGINT (default 30)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
