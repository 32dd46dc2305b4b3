"""How networks run on CUDA: cuDNN autotuning, exact float32, and batch-size buckets.

- cuDNN autotuning (``cudnn.benchmark``) picks the fastest convolution algorithm per input shape,
  on the first call with that shape, which takes much longer than the call itself. So on CUDA a
  network's batches are padded up to a *bucket* (powers of two up to ``max_batch_size``, and
  ``max_batch_size`` itself), and every bucket is run once at load: no request pays for tuning or
  for a kernel's first compile. A request larger than ``max_batch_size`` (it runs alone) is not
  padded; its first shape is tuned on first use.
- TF32: torch lets cuDNN convolutions use TF32 by default, which rounds float32 inputs to a 10-bit
  mantissa: a float32 network would no longer compute in float32. lrnserve turns it off when a
  float32 network loads on CUDA, unless that model opts in (``allow_tf32``). torch's switch is
  process-wide, so an opt-in applies to every model of the server process; the log says so.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a network on CUDA runs at: powers of two below ``max_batch_size``, and it."""
    buckets = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return (*buckets, max_batch_size)


def bucket_for(samples: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``samples``; ``samples`` itself beyond the largest."""
    for bucket in buckets:
        if bucket >= samples:
            return bucket
    return samples


def configure_network(name: str, dtype: torch.dtype, allow_tf32: bool) -> str:
    """Set torch's process-wide CUDA switches for a network about to load; returns a log phrase."""
    torch.backends.cudnn.benchmark = True
    if dtype != torch.float32:
        return "cuDNN autotuning"
    if allow_tf32:
        logger.warning(
            "model %s: allow_tf32 turns on TF32 for cuDNN convolutions and matrix products in the whole "
            "server process (torch's switch is process-wide): float32 networks round to TF32",
            name,
        )
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return f"cuDNN autotuning, TF32 {'on (allow_tf32)' if allow_tf32 else 'off (exact float32)'}"
