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
    # Offsets beyond the tensor only add zeros: pad no further than it reaches (a huge size
    # must not allocate a huge padded copy), and divide by the full window as the definition says.
    if mode == "across":
        channels = x.shape[1]
        before, after = min(size // 2, channels - 1), min((size - 1) // 2, channels - 1)
        padded = F.pad(square, (0, 0, 0, 0, before, after))
        total = padded[:, 0:channels]
        for offset in range(1, before + after + 1):
            total = total + padded[:, offset : offset + channels]
        mean = total / size
    else:
        height, width = x.shape[2], x.shape[3]
        rows = (min(size // 2, height - 1), min((size - 1) // 2, height - 1))
        cols = (min(size // 2, width - 1), min((size - 1) // 2, width - 1))
        padded = F.pad(square, (cols[0], cols[1], rows[0], rows[1]))
        kernel = (sum(rows) + 1, sum(cols) + 1)
        mean = F.avg_pool2d(padded, kernel, stride=1) * (kernel[0] * kernel[1] / (size * size))
    y = xa / (k_ + alpha_ * mean).pow(beta_)
    return y.to(x.dtype)


def window_sum(t: torch.Tensor, size: int, mode: Mode, mirrored: bool = False) -> torch.Tensor:
    """The sum of ``t`` over each element's LRN window (zeros outside the tensor); ``mirrored``
    swaps the neighbours before and after, which is the window's transpose (for the gradient)."""
    before, after = size // 2, (size - 1) // 2
    if mirrored:
        before, after = after, before
    if mode == "across":
        channels = t.shape[1]
        lo, hi = min(before, channels - 1), min(after, channels - 1)
        padded = F.pad(t, (0, 0, 0, 0, lo, hi))
        total = padded[:, 0:channels]
        for offset in range(1, lo + hi + 1):
            total = total + padded[:, offset : offset + channels]
        return total
    height, width = t.shape[2], t.shape[3]
    rows = (min(before, height - 1), min(after, height - 1))
    cols = (min(before, width - 1), min(after, width - 1))
    padded = F.pad(t, (cols[0], cols[1], rows[0], rows[1]))
    kernel = (sum(rows) + 1, sum(cols) + 1)
    return F.avg_pool2d(padded, kernel, stride=1) * float(kernel[0] * kernel[1])


def local_response_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: Mode
) -> torch.Tensor:
    """The gradient of LRN with respect to x, for scalar parameters, in torch operations.

    With ``d = k + a * S(x^2)`` (``a = alpha / window``) and ``y = x * d^-beta``:
    ``dx = g * d^-beta - 2 a beta x * S^T(g * y / d)``, ``S^T`` the mirrored window sum.
    """
    acc = accumulation_dtype(x.dtype)
    xa, ga = x.to(acc), grad.to(acc)
    scale = alpha / (size if mode == "across" else size * size)
    d = k + scale * window_sum(xa * xa, size, mode)
    inverse = d.pow(-beta)
    y = xa * inverse
    gx = ga * inverse - (2.0 * scale * beta) * xa * window_sum(ga * y / d, size, mode, mirrored=True)
    return gx.to(x.dtype)
