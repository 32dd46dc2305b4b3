"""LRN written as a composition of torch operations.

Used where the fused CPU kernel is not: on CUDA and other devices, when autograd
needs a graph, and on CPUs without a C++ compiler. Window sums are direct sums
of shifted slices (across) or an average pool over an explicitly zero-padded
tensor (within), both exact to rounding; half inputs are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .params import Mode


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_response_norm_composed(
    x: torch.Tensor,
    size: int,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    k: torch.Tensor,
    mode: Mode,
) -> torch.Tensor:
    """x: NCHW; alpha/beta/k: one value per sample (shape [N]) on any device."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    shape = (-1, 1, 1, 1)
    alpha_, beta_, k_ = (p.to(device=x.device, dtype=acc).reshape(shape) for p in (alpha, beta, k))
    square = xa * xa
    before, after = size // 2, (size - 1) // 2
    channels = x.shape[1]
    if mode == "across":
        padded = F.pad(square, (0, 0, 0, 0, before, after))
        total = padded[:, 0:channels]
        for offset in range(1, size):
            total = total + padded[:, offset : offset + channels]
        mean = total / size
    else:
        padded = F.pad(square, (before, after, before, after))
        mean = F.avg_pool2d(padded, size, stride=1)
    y = xa / (k_ + alpha_ * mean).pow(beta_)
    return y.to(x.dtype)
