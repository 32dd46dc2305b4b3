"""Runs one model's batches on its device, off the event loop.

Each model has ``instances`` worker threads; each thread is one instance and,
on CUDA, owns one stream (two by default, so that one's copies overlap the
other's compute). On the CPU each instance computes with its own share
of the cores: ``threads`` intra-op threads, by default the cores divided among
the instances. Networks default to several instances (``default_cpu_instances``):
a multi-threaded forward pass waits at every layer for its slowest thread, and
on a server whose cores also run the event loop, gRPC and often clients, some
thread is often descheduled; instances with fewer threads each stall less of
the machine (bench/serve.py --instances/--threads measures layouts).

The batcher hands a thread a batch with ``submit`` and gets the result back on
its event loop through one ``call_soon_threadsafe`` (no per-batch futures or
executor bookkeeping: on small requests the hand-off is a large part of a
batch's cost). A batch of several requests so small that the hand-off would cost
more than the compute (``Servable.cheap``: LRN batches up to 16384 elements) is
computed by ``submit`` itself, on the event loop thread, through the servable's
torch-free path.

On the CPU a servable may take the requests' bytes as they are
(``Servable.run_raw``: the LRN op, which needs no torch call and no gathering
copy); otherwise the requests' bytes are joined once into the batch tensor (a
single request is used in place). On CUDA they are copied once into a pinned
staging buffer from the executor's pool (``pinned``: reused across batches,
never allocated per batch once warm), moved with a non-blocking copy on the
instance's own stream, computed, and copied back into another pooled pinned
buffer; the instance thread waits on its stream, so one instance's copies
overlap the others' compute. Each request's output is a view of the batch's
output, copied once, into the response message (a pooled output buffer goes
back to the pool once the last of those views is gone). When memory runs out (device or host) the batch is split
in halves and retried; a single sample that still does not fit fails with
RESOURCE_EXHAUSTED, and only that request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .cuda import bucket_for
from .errors import ResourceExhausted, ServingError
from .pinned import PinnedPool
from .servables import Servable
from .work import Abandonment, BatchAbandoned, BatchResult, Done, Output, Work

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or torch's CPU allocator giving up."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


_Job = tuple[list[Work], asyncio.AbstractEventLoop, Done, Abandonment]


class _NoRawPath(Exception):
    """The servable computes this batch through torch only (``Executor._run_inline``)."""


CUDA_INSTANCES = 2  # default instances (streams) of a model on CUDA
# Pinned staging memory an executor on CUDA keeps between batches: an AlexNet batch of 128 images
# is 75 MiB in; an LRN batch of 32 x [96, 55, 55] 35 MiB each way.
DEFAULT_STAGING_BYTES = 512 * 1024 * 1024


def instance_layout(servable: Servable, device: torch.device, instances: int, threads: int) -> tuple[int, int]:
    """How many instances a model runs and how many CPU threads each computes with; 0 for
    either means choose: instances as the servable prefers on this device, threads as torch's
    thread count shared out among the instances (at least one each)."""
    cores = torch.get_num_threads()
    if instances <= 0:
        # On CUDA two streams: one instance's copies overlap the other's compute.
        instances = servable.default_cpu_instances(cores) if device.type == "cpu" else CUDA_INSTANCES
    if threads <= 0:
        threads = max(1, cores // instances)
    return instances, threads


class Executor:
    """Computes one model's batches on its instance threads (the batcher's ``Runner``).

    Contract: ``submit`` from an event loop thread; ``done`` is called back on that loop with a
    ``BatchResult`` holding one output or one error per item, or with the exception that failed
    the whole batch. ``close`` lets the threads end after the batches already submitted.
    """

    def __init__(
        self,
        servable: Servable,
        device: torch.device,
        instances: int = 0,
        threads: int = 0,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        staged: bool | None = None,
    ) -> None:
        """``staging_bytes``: on CUDA, the most pinned host memory kept for reuse between batches.
        ``staged``: run batches through pooled staging buffers (and batch buckets); None: on CUDA
        (True on the CPU runs the same path over ordinary memory, so CI tests it without a GPU)."""
        self._servable = servable
        self.device = device
        self.instances, self.threads = instance_layout(servable, device, instances, threads)
        if staged is None:
            staged = device.type == "cuda"
        self.staging = PinnedPool(staging_bytes, pin=device.type == "cuda") if staged else None
        servable.threads = self.threads
        self._local = threading.local()
        with warnings.catch_warnings():
            # torch warns once per process that tensors over read-only request bytes are
            # writable; say it here, silenced, rather than in the log of the first request.
            warnings.simplefilter("ignore", UserWarning)
            torch.frombuffer(b"\0\0\0\0", dtype=torch.float32)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"lrnserve-{servable.name}_{i}", daemon=True)
            for i in range(self.instances)
        ]
        process_default = torch.get_num_threads()
        self._set_up = threading.Semaphore(0)
        for thread in self._threads:
            thread.start()
        for _ in self._threads:  # each instance has its own count before the default is put back
            self._set_up.acquire()
        if self.device.type == "cpu":
            # torch.set_num_threads also sets the count that threads started later begin with;
            # give those (other models' instances, loaders) the process default back.
            torch.set_num_threads(process_default)

    def submit(self, items: Sequence[Work], done: Done, abandonment: Abandonment | None = None) -> None:
        """Compute ``items`` as one batch on a free instance; ``done`` gets the result (or the
        exception) on the calling thread's event loop. A batch too small to be worth the hand-off
        is computed here, on the event loop thread (``Servable.cheap``)."""
        loop = asyncio.get_running_loop()
        abandonment = abandonment or Abandonment()
        if len(items) > 1 and self._cheap(items):
            try:
                result = self._run_inline(list(items), abandonment)
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: the batch fails with it
                loop.call_soon(done, exc)
                raise
            if result is not None:
                loop.call_soon(done, result)
                return
        self._jobs.put((list(items), loop, done, abandonment))

    def _cheap(self, items: Sequence[Work]) -> bool:
        first = items[0]
        shape = (sum(w.samples for w in items), *first.shape[1:])
        return self.staging is None and self._servable.cheap(shape, first.model_group)

    def _run_inline(self, items: list[Work], abandonment: Abandonment) -> BatchResult | Exception | None:
        """The batch through the servable's torch-free path on the calling thread (split in halves
        when memory runs out, as on an instance); None where the servable has no such path for
        it (the batch then goes to an instance)."""
        try:
            return self._run(items, abandonment, raw_only=True)
        except _NoRawPath:
            return None
        except Exception as exc:  # the batcher turns it into each request's error
            return exc

    def close(self, wait: bool = True) -> None:
        """Let the instance threads end once the batches already submitted are done."""
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
            if self.staging is not None:
                self.staging.close()

    # ---- worker thread side ----

    def _serve(self) -> None:
        torch.set_grad_enabled(False)  # for the life of the instance, not toggled per batch
        if self.device.type == "cpu":
            # torch sets up a thread's pool on first use, from the process-wide count: let it,
            # then give this thread its own count.
            torch.get_num_threads()
            torch.set_num_threads(self.threads)
        self._set_up.release()
        while (job := self._jobs.get()) is not None:
            items, loop, done, abandonment = job
            result: BatchResult | BaseException
            try:
                result = self._run(items, abandonment)
            except BaseException as exc:  # the batcher turns it into each request's error
                result = exc
            try:
                loop.call_soon_threadsafe(done, result)
            except RuntimeError:  # the loop closed while this batch ran: nobody waits for it
                logger.debug("%s: batch finished after its event loop closed", self._servable.name)
            # Waiting for the next batch must not keep this one's requests and output alive.
            del job, items, done, abandonment, result

    def _run(self, items: list[Work], abandonment: Abandonment, raw_only: bool = False) -> BatchResult:
        start = time.perf_counter()
        outputs = self._run_items(items, abandonment, raw_only)
        return BatchResult(outputs, time.perf_counter() - start)

    def _run_items(
        self, items: list[Work], abandonment: Abandonment, raw_only: bool = False
    ) -> list[Output | ServingError]:
        """Compute ``items`` as one batch; when memory runs out (device or host), in halves,
        down to single samples, so that only a request that cannot fit at all fails."""
        try:
            outputs: list[Output | ServingError] = list(self._compute(items, abandonment, raw_only))
            return outputs
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        samples = sum(w.samples for w in items)
        if len(items) > 1:
            half = len(items) // 2
            logger.warning("%s: out of memory at %d samples; retrying in halves", self._servable.name, samples)
            return self._run_items(items[:half], abandonment, raw_only) + self._run_items(
                items[half:], abandonment, raw_only
            )
        (work,) = items
        if work.samples == 1:
            return [
                ResourceExhausted(
                    f"model '{self._servable.name}': out of {self.device.type} memory for one sample of shape "
                    f"{list(work.shape[1:])}"
                )
            ]
        parts = [self._run_items([part], abandonment, raw_only)[0] for part in work.halves()]
        for part in parts:
            if isinstance(part, ServingError):
                return [part]
        try:
            return [b"".join(parts)]  # type: ignore[arg-type]
        except MemoryError:
            return [ResourceExhausted(f"model '{self._servable.name}': out of memory joining the output")]

    def _compute(self, items: list[Work], abandonment: Abandonment, raw_only: bool = False) -> list[Output]:
        """``raw_only``: raise ``_NoRawPath`` rather than compute through torch."""
        if abandonment.abandoned:
            raise BatchAbandoned
        first = items[0]
        shape = (sum(w.samples for w in items), *first.shape[1:])
        scalars = self._per_sample(items, shape[0])
        if self.staging is not None:
            return self._compute_staged(items, shape, scalars, abandonment)
        outputs = self._compute_raw(items, shape, scalars)
        if outputs is not None:
            return outputs
        if raw_only:
            raise _NoRawPath
        # One request: its own bytes (models only read their input); several: one copy each.
        raw = first.payload if len(items) == 1 else np.concatenate([w.payload for w in items])
        x = torch.frombuffer(raw, dtype=first.dtype).view(shape)
        return self._split(items, shape, self._servable.run(first.model_group, x, self._tensors(scalars), abandonment))

    def _compute_raw(
        self, items: list[Work], shape: tuple[int, ...], scalars: dict[str, np.ndarray]
    ) -> list[Output] | None:
        """The batch through ``Servable.run_raw`` (no torch call); None where the servable cannot."""
        first = items[0]
        out = self._servable.run_raw(first.model_group, [w.payload for w in items], shape, first.dtype, scalars)
        return None if out is None else self._cut(items, shape, memoryview(out))  # type: ignore[arg-type]

    @staticmethod
    def _gather(items: list[Work], flat: np.ndarray) -> None:
        offset = 0
        for work in items:
            end = offset + work.payload.size
            flat[offset:end] = work.payload
            offset = end

    def _split(self, items: list[Work], shape: tuple[int, ...], y: torch.Tensor) -> list[Output]:
        return self._cut(items, shape, memoryview(y.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]

    @staticmethod
    def _cut(items: list[Work], shape: tuple[int, ...], out: memoryview) -> list[Output]:
        """Each request's part of the batch's output, as a view."""
        per_sample = out.nbytes // shape[0]
        outputs: list[Output] = []
        offset = 0
        for work in items:
            end = offset + work.samples * per_sample
            outputs.append(out[offset:end])
            offset = end
        return outputs

    @staticmethod
    def _per_sample(items: list[Work], samples: int) -> dict[str, np.ndarray]:
        """Each scalar as one float64 value per sample of the batch: each request's value, repeated."""
        first = items[0].scalars
        if all(w.scalars is first for w in items):  # one set of values (e.g. every request's defaults)
            return {name: np.full(samples, value, dtype=np.float64) for name, value in first.items()}
        repeats = None if all(w.samples == 1 for w in items) else [w.samples for w in items]
        scalars = {}
        for name in first:
            values = np.array([w.scalars[name] for w in items], dtype=np.float64)
            scalars[name] = values if repeats is None else np.repeat(values, repeats)
        return scalars

    @staticmethod
    def _tensors(scalars: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(values) for name, values in scalars.items()}

    def _compute_staged(
        self, items: list[Work], shape: tuple[int, ...], scalars: dict[str, np.ndarray], abandonment: Abandonment
    ) -> list[Output]:
        """The batch through pooled staging buffers: gathered into one (padded up to the
        servable's batch bucket), copied to the device, computed, copied back into another."""
        assert self.staging is not None
        first = items[0]
        received = sum(w.payload.nbytes for w in items)
        # A network on CUDA runs at its warmed-up batch sizes (cuda.batch_buckets): the rest is zeros.
        padded = (bucket_for(shape[0], self._servable.batch_buckets), *shape[1:])
        staged = self.staging.lease(received // shape[0] * padded[0])
        self._gather(items, staged)
        staged[received:] = 0
        batch = torch.from_numpy(staged).view(first.dtype).view(padded)
        stream = self._stream() if self.device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                x = batch.to(self.device, non_blocking=True)
                y = self._servable.run(first.model_group, x, self._tensors(scalars), abandonment)[: shape[0]]
                answer = self.staging.lease(y.numel() * y.element_size())
                torch.from_numpy(answer).view(y.dtype).view(y.shape).copy_(y, non_blocking=True)
        finally:
            if stream is not None:
                # Waits on this instance's stream only (releasing the GIL): the others' copies and
                # compute go on. Also on failure: no staging buffer returns to the pool mid-copy.
                stream.synchronize()
        del batch, staged, x, y  # the input's staging buffer goes back to the pool now
        return self._cut(items, shape, memoryview(answer))  # type: ignore[arg-type]

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            self._local.stream = stream
        return stream
