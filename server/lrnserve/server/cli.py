"""``lrnserve serve``: its flags (made from the settings' declarations), and the process's life:
run the service until SIGTERM/SIGINT, then drain and exit.

Exit codes: 0 after a complete drain; 2 for a configuration error; 1 when start-up failed;
``EXIT_DRAIN_CUT_SHORT`` when the grace period ended with requests still queued or running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lrnserve.client.allocator import keep_freed_memory, limit_arenas
from lrnserve.client.cli import Parser

from . import eventloop
from .app import LrnServer
from .repository import ServableFactory
from .schema import ConfigError, Names, Setting
from .servables import create_servable
from .settings import BUILT_IN_NETWORKS, SERVER_SETTINGS, ServerSettings, load_settings

logger = logging.getLogger("lrnserve")
EXIT_DRAIN_CUT_SHORT = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per server setting that has one."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config: [server] settings and [models.NAME] tables ($LRNSERVE_CONFIG)"
    )
    for declared in SERVER_SETTINGS.values():
        if not declared.flag_names:
            continue
        doc = declared.doc if declared.flag_sets is not False else f"do not {declared.doc}"
        text = f"{doc} (${declared.variable}; default {_default(declared)})"
        if declared.flag_sets is not None:
            parser.add_argument(
                *declared.flag_names, dest=declared.name, action="store_const", const=declared.flag_sets, help=text
            )
        elif isinstance(declared.check, Names):  # repeatable: --load-model a --load-model b
            parser.add_argument(*declared.flag_names, dest=declared.name, metavar="NAME", action="append", help=text)
        else:
            metavar = declared.name.rsplit("_", 1)[-1].upper()
            parser.add_argument(*declared.flag_names, dest=declared.name, metavar=metavar, help=text)


def _default(declared: Setting) -> str:
    return "unset" if declared.default is None else str(declared.default).lower()


def build_parser(prog: str = "lrnserve serve") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="Run the gRPC inference server. Without --config it serves the embedded models "
        f"lrn, {', '.join(BUILT_IN_NETWORKS)}. Settings: flags > LRNSERVE_* environment variables > config file > "
        "defaults (docs/settings.md). TLS is required unless --plaintext is given. SIGTERM/SIGINT drain, then "
        "exit 0 (3 if the grace period ran out first).",
    )
    add_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = {name: getattr(args, name, None) for name in SERVER_SETTINGS}
    return load_settings(Path(args.config) if args.config else None, os.environ, overrides)


async def _serve(settings: ServerSettings, servables: ServableFactory) -> int:
    server = LrnServer(settings, servables=servables)
    loop = asyncio.get_running_loop()
    stopping: asyncio.Task[bool] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping is None:
            logger.info("%s received: draining (grace %.1fs)", signal.Signals(signum).name, settings.grace_seconds)
            stopping = asyncio.create_task(server.stop())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
    except Exception as exc:
        logger.error("start-up failed: %s", exc)
        return 1
    await server.wait_stopped()
    return 0 if server.drained else EXIT_DRAIN_CUT_SHORT


def serve(settings: ServerSettings, servables: ServableFactory = create_servable) -> int:
    """Run the server in this process until a signal drains it; returns the exit code."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if keep_freed_memory(settings.allocator_cache_bytes):
        logger.info("C heap keeps up to %d MiB of freed buffers for reuse", settings.allocator_cache_bytes >> 20)
    if limit_arenas(settings.allocator_arenas):
        logger.debug("threads share at most %d C heaps", settings.allocator_arenas)
    try:
        code = eventloop.run(_serve(settings, servables))
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    if code == EXIT_DRAIN_CUT_SHORT:
        # Batches still computing after the grace period: do not wait for their threads.
        logging.shutdown()
        os._exit(EXIT_DRAIN_CUT_SHORT)
    return code


def main(
    argv: Sequence[str] | None = None, prog: str = "lrnserve serve", servables: ServableFactory = create_servable
) -> int:
    """The ``serve`` command line; ``servables`` makes the models (tests pass a wrapping factory)."""
    args = build_parser(prog).parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    return serve(settings, servables)


if __name__ == "__main__":
    sys.exit(main())
