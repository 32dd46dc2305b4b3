"""Keep large freed buffers in the C heap instead of returning them to the kernel.

By default glibc serves every allocation above a (dynamic) threshold with a
fresh ``mmap`` and gives it back with ``munmap`` when freed. A server that
receives, batches and answers megabyte tensors allocates such buffers several
times per request (gRPC message bytes, batch buffers, network activations), so
each one is page-faulted and zeroed by the kernel again. On the 2-core CI
machine that was the largest single cost of serving lrn [1,96,55,55] and
AlexNet (bench/serve.py: about a third of the event loop thread's time).
Raising the mmap and trim thresholds lets freed buffers be reused; the price
is that the process keeps up to ``cache_bytes`` of freed memory. The load
generator (``lrnserve bench``) uses it too: it receives the same megabyte
answers and should spend as little of a shared machine as it can.

It changes the whole process, so only entry points call it, never library code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def keep_freed_memory(cache_bytes: int) -> bool:
    """Let glibc's heap serve and keep buffers up to ``cache_bytes``; False where not glibc or 0."""
    if cache_bytes <= 0:
        return False
    libc = _glibc()
    if libc is None:
        logger.debug("allocator tuning skipped: not glibc")
        return False
    mmap_threshold = min(cache_bytes, MAX_MMAP_THRESHOLD)
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, cache_bytes))
    if ok and cache_bytes > MAX_MMAP_THRESHOLD:
        # Above glibc's largest threshold every buffer would still be mapped and zeroed anew at
        # each use: AlexNet's and CaffeNet's first activations at batch 32 are 37 MB each. With
        # no mapping at all they come from the heap too: both networks ran 4-5 % faster at batch
        # 32 (213-220 vs 223-229 ms, 2 threads), and the issue-scale flood stayed within the
        # memory formula and went back to idle (bench/flood.py).
        ok = bool(libc.mallopt(M_MMAP_MAX, 0))
    if not ok:
        logger.warning("allocator tuning refused by glibc (allocator_cache_bytes=%d)", cache_bytes)
    return ok


def limit_arenas(arenas: int) -> bool:
    """At most ``arenas`` C heaps for the process's threads; False where not glibc or 0.

    glibc gives threads up to 8 x cores heaps of their own. Each keeps what its thread last
    allocated and freed, and after a flood of large requests handled by many threads (gRPC's,
    the instances', torch's) those heaps stayed hundreds of MiB resident that the idle trim
    could not give back: ``malloc_trim`` releases the free pages inside every heap, but the free
    space at the top of a thread's heap only when that thread frees into it again (and only
    beyond the trim threshold, ``allocator_cache_bytes``). With two heaps the server went back
    to within 20 % of its cold size (63 MiB over it after the issue-scale flood, every time);
    with one, which the trim gives back whole, to its cold size, at the same throughput
    (bench/serve.py, lrn [1,16,8,8] and [1,96,55,55] at concurrency 16, alternating runs).
    Call before threads start: a thread keeps the heap it was given."""
    if arenas <= 0:
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_ARENA_MAX, arenas))


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``), in every
    thread's arena: after a burst of large requests the freed buffers are otherwise kept, and a
    server's resident memory ratchets up burst after burst. False where not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
