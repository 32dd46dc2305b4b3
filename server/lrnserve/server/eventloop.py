"""The event loop the server runs on: uvloop when installed (it is with the server extra
on Linux and macOS), else asyncio's default. uvloop handles about 1.5x the RPCs per core
of asyncio's default loop under grpc.aio (bench/serve.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def in_own_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a new thread that ends when it returns, awaited without blocking the loop.

    For work that computes with torch or the fused LRN kernel outside an instance (model builds,
    loads and their warm-ups). OpenMP gives every thread that runs a parallel region a team of
    workers, kept until that thread ends; a reused pool thread would keep its team for good.
    Once OpenMP's threads outnumber the cores it stops letting idle workers spin, and every
    parallel op of every instance then waits for its workers to wake: on 2 cores, with a 2-thread
    instance, an average pool over [1, 32, 16, 16] took 38 us instead of 11 and cifar10_full at
    batch 1 1.1 ms instead of 0.56 ms. A thread that ends takes its team with it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task, raised there
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for the result
            logger.debug("%s finished after its event loop closed", name)

    threading.Thread(target=body, name=name).start()
    return await future
