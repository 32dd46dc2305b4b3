"""``lrnserve serve``: run the service until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from lrnserve.client._allocator import keep_freed_memory

from . import eventloop
from .app import LrnServer
from .settings import ConfigError, ServerSettings, load_settings

logger = logging.getLogger("lrnserve")
EXIT_UNDRAINED = -1  # internal: stopped with work still running


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = {
        "host": args.host,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "device": args.device,
        "grace_seconds": args.grace,
        "log_level": args.log_level,
        "metrics_enabled": False if args.no_metrics else None,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "metrics_tls": True if args.metrics_tls else None,
        "plaintext": True if args.plaintext else None,
        "token_file": args.token_file,
    }
    return load_settings(Path(args.config) if args.config else None, os.environ, overrides)


async def _serve(settings: ServerSettings) -> int:
    server = LrnServer(settings)
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
    return 0 if server.drained else EXIT_UNDRAINED


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"lrnserve serve: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if keep_freed_memory(settings.allocator_cache_bytes):
        logger.info("C heap keeps up to %d MiB of freed buffers for reuse", settings.allocator_cache_bytes >> 20)
    try:
        code = eventloop.run(_serve(settings))
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    if code == EXIT_UNDRAINED:
        # Batches still computing after the grace period: do not wait for their threads.
        logging.shutdown()
        os._exit(0)
    return code
