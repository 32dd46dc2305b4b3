"""Runs one model's batches on its device, off the event loop.

Each model has ``instances`` worker threads; each thread is one instance and,
on CUDA, owns one stream. A batch is assembled by copying every request's
bytes once into a (pinned, on CUDA) batch buffer, moved to the device with a
non-blocking copy, computed, and copied back the same way. When memory runs out
(device or host) the batch is split in halves and retried; a single sample that
still does not fit fails with RESOURCE_EXHAUSTED, and only that request fails.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import ResourceExhausted, ServingError
from .servables import Servable

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or torch's CPU allocator giving up."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


@dataclass(frozen=True)
class Work:
    """One validated request, as the batcher and executor see it."""

    payload: np.ndarray  # the request tensor's bytes (uint8, C order, little-endian)
    shape: tuple[int, ...]  # N, C, H, W
    dtype: torch.dtype
    model_group: Hashable  # what the servable needs to run the batch (e.g. LRN mode, size)
    scalars: Mapping[str, float]  # per-request values, broadcast per sample

    @property
    def samples(self) -> int:
        return self.shape[0]

    @property
    def group(self) -> Hashable:
        """Requests with equal groups can be concatenated along dim 0."""
        return (self.shape[1:], self.dtype, self.model_group)

    def halves(self) -> tuple[Work, Work]:
        """The first and second half of this request's samples (it has at least two)."""
        half = self.samples // 2
        cut = self.payload.size // self.samples * half
        first = replace(self, payload=self.payload[:cut], shape=(half, *self.shape[1:]))
        second = replace(self, payload=self.payload[cut:], shape=(self.samples - half, *self.shape[1:]))
        return first, second


@dataclass(frozen=True)
class BatchResult:
    outputs: list[torch.Tensor | ServingError]  # per work item, in order: its output or its own error
    compute_seconds: float  # assembly, host-to-device, compute, device-to-host


class Executor:
    def __init__(self, servable: Servable, device: torch.device, instances: int) -> None:
        self.servable = servable
        self.device = device
        self.instances = instances
        # Autograd is off for the life of each instance thread, not toggled per batch.
        self._pool = ThreadPoolExecutor(
            instances,
            thread_name_prefix=f"lrnserve-{servable.name}",
            initializer=torch.set_grad_enabled,
            initargs=(False,),
        )
        self._local = threading.local()

    async def run(self, items: Sequence[Work]) -> BatchResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, list(items))

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    # ---- worker thread side ----

    def _run(self, items: list[Work]) -> BatchResult:
        start = time.perf_counter()
        outputs = self._run_items(items)
        return BatchResult(outputs, time.perf_counter() - start)

    def _run_items(self, items: list[Work]) -> list[torch.Tensor | ServingError]:
        """Compute ``items`` as one batch; when memory runs out (device or host), in halves,
        down to single samples, so that only a request that cannot fit at all fails."""
        try:
            return list(self._compute(items))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        samples = sum(w.samples for w in items)
        if len(items) > 1:
            half = len(items) // 2
            logger.warning("%s: out of memory at %d samples; retrying in halves", self.servable.name, samples)
            return self._run_items(items[:half]) + self._run_items(items[half:])
        (work,) = items
        if work.samples == 1:
            return [
                ResourceExhausted(
                    f"model '{self.servable.name}': out of {self.device.type} memory for one sample of shape "
                    f"{list(work.shape[1:])}"
                )
            ]
        parts = [self._run_items([part])[0] for part in work.halves()]
        for part in parts:
            if isinstance(part, ServingError):
                return [part]
        try:
            return [torch.cat(parts)]  # type: ignore[arg-type]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return [ResourceExhausted(f"model '{self.servable.name}': out of memory joining the output")]

    def _compute(self, items: list[Work]) -> list[torch.Tensor]:
        first = items[0]
        pin = self.device.type == "cuda"
        total = sum(w.samples for w in items)
        batch = torch.empty((total, *first.shape[1:]), dtype=first.dtype, pin_memory=pin)
        flat = batch.view(-1).view(torch.uint8).numpy()
        offset = 0
        for work in items:
            flat[offset : offset + work.payload.size] = work.payload
            offset += work.payload.size
        scalars = {name: self._per_sample(items, name) for name in first.scalars}
        if self.device.type == "cuda":
            y = self._forward_cuda(first.model_group, batch, scalars)
        else:
            y = self.servable.run(first.model_group, batch, scalars)
        outputs, offset = [], 0
        for work in items:
            outputs.append(y[offset : offset + work.samples])
            offset += work.samples
        return outputs

    @staticmethod
    def _per_sample(items: list[Work], name: str) -> torch.Tensor:
        """One float64 value per sample of the batch: each request's value, repeated."""
        if len(items) == 1:
            return torch.full((items[0].samples,), items[0].scalars[name], dtype=torch.float64)
        values = [w.scalars[name] for w in items for _ in range(w.samples)]
        return torch.tensor(values, dtype=torch.float64)

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            self._local.stream = stream
        return stream

    def _forward_cuda(self, group: Hashable, batch: torch.Tensor, scalars: dict[str, torch.Tensor]) -> torch.Tensor:
        stream = self._stream()
        with torch.cuda.stream(stream):
            x = batch.to(self.device, non_blocking=True)
            y = self.servable.run(group, x, scalars)
            out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            out.copy_(y, non_blocking=True)
        stream.synchronize()
        return out
