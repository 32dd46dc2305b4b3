"""The LRN kernels in the Triton language (the semantics of docs/lrn.md), for ``triton_lrn``.

The functions are left undecorated: ``triton_lrn`` wraps each one both with ``triton.jit`` (for
CUDA tensors) and with Triton's interpreter (for CPU tensors in tests), so that one process can
run both. This module imports Triton, so only ``triton_lrn`` imports it, once Triton is known to
be installed.

Both kernels slide the window along one axis with a running sum of squares: each step adds the
entering line and subtracts the leaving one. A running sum cancels, so it is carried in float64
(squares are formed in float32 exactly as the C++ kernel and the composed op form them, and each
one is later subtracted bit for bit), and non-finite squares are counted instead of summed, so an
inf or nan affects only the windows that contain it, as in a direct sum. A program owns one
chunk of the axis and first sums the window of the chunk's first position (at most ``size - 1``
extra lines), so small batches still spread over the device.

Parameters: ``p_ptr`` points at float32 ``(alpha / window, beta, k)`` triples, one per sample
(``p_stride`` 3) or one for all (``p_stride`` 0).
"""

# Triton's language module has no type information, and these bodies are Triton, not Python.
# mypy: ignore-errors

from __future__ import annotations

import triton.language as tl


def lrn_across(x_ptr, y_ptr, p_ptr, p_stride, C, HW, before, after, chunk, BLOCK: tl.constexpr):
    """Program (n, pixel block, channel chunk): the chunk's channels for BLOCK pixels of sample n.
    Reads per input element: entering, leaving and centre (the last two mostly from cache)."""
    n = tl.program_id(0)
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    first = tl.program_id(2) * chunk
    last = tl.minimum(first + chunk, C)
    low = tl.maximum(first - before, 0)  # the first channel in the running sum
    offset = n.to(tl.int64) * C * HW + pixels
    scale = tl.load(p_ptr + n * p_stride).to(tl.float64)
    beta = tl.load(p_ptr + n * p_stride + 1)
    k = tl.load(p_ptr + n * p_stride + 2).to(tl.float64)
    total = tl.full([BLOCK], 0, tl.float64)
    nans = tl.full([BLOCK], 0, tl.int32)
    infs = tl.full([BLOCK], 0, tl.int32)
    for c in range(low - after, last):
        enter = c + after
        v = tl.load(x_ptr + offset + tl.cast(enter, tl.int64) * HW, mask=pixels < HW * (enter < C), other=0.0)
        sq = v.to(tl.float32) * v.to(tl.float32)
        total += tl.where(sq < float("inf"), sq, 0.0).to(tl.float64)
        nans += (sq != sq).to(tl.int32)
        infs += (sq == float("inf")).to(tl.int32)
        leave = c - before - 1
        u = tl.load(x_ptr + offset + tl.cast(leave, tl.int64) * HW, mask=pixels < HW * (leave >= low), other=0.0)
        sq = u.to(tl.float32) * u.to(tl.float32)
        total -= tl.where(sq < float("inf"), sq, 0.0).to(tl.float64)
        nans -= (sq != sq).to(tl.int32)
        infs -= (sq == float("inf")).to(tl.int32)
        out = pixels < HW * (c >= first)
        centre = x_ptr + offset + tl.cast(c, tl.int64) * HW
        xc = tl.load(centre, mask=out, other=0.0).to(tl.float32)
        s = tl.where(nans > 0, float("nan"), tl.where(infs > 0, float("inf"), total))
        d = (k + scale * s).to(tl.float32)
        if beta == 0.75:  # the classic networks' value: two correctly rounded roots
            root = tl.sqrt_rn(d)
            p = root * tl.sqrt_rn(root)
        else:
            p = tl.exp2(beta * tl.log2(d))
        y = tl.div_rn(xc, p)
        tl.store(y_ptr + offset + tl.cast(c, tl.int64) * HW, y.to(y_ptr.dtype.element_ty), mask=out)


def lrn_within(x_ptr, y_ptr, p_ptr, p_stride, C, H, W, before, after, left, right, chunk, BLOCK: tl.constexpr):
    """Program (n*C + c, column block, row chunk): the chunk's rows of one channel's plane.

    Separable: a row's horizontal window sum (``left``/``right`` columns either side, clipped to
    the plane) is a direct sum of squares from cache; a running sum slides over those row sums
    down the plane. Each input element is read from memory once and from cache at most
    ``2 * min(size, 2W - 1) + 1`` times.
    """
    plane = tl.program_id(0)
    n = plane // C
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    first = tl.program_id(2) * chunk
    last = tl.minimum(first + chunk, H)
    low = tl.maximum(first - before, 0)  # the first row in the running sum
    base = plane.to(tl.int64) * H * W
    scale = tl.load(p_ptr + n * p_stride).to(tl.float64)
    beta = tl.load(p_ptr + n * p_stride + 1)
    k = tl.load(p_ptr + n * p_stride + 2).to(tl.float64)
    total = tl.full([BLOCK], 0, tl.float64)
    nans = tl.full([BLOCK], 0, tl.int32)
    infs = tl.full([BLOCK], 0, tl.int32)
    for r in range(low - after, last):
        enter = r + after
        row = x_ptr + base + tl.cast(enter, tl.int64) * W
        limit = W * (enter < H)
        sq = tl.full([BLOCK], 0, tl.float32)
        for dw in range(-left, right + 1):
            src = cols + dw
            v = tl.load(row + src, mask=(src >= 0) & (src < limit), other=0.0).to(tl.float32)
            sq += v * v
        total += tl.where(sq < float("inf"), sq, 0.0).to(tl.float64)
        nans += (sq != sq).to(tl.int32)
        infs += (sq == float("inf")).to(tl.int32)
        leave = r - before - 1
        row = x_ptr + base + tl.cast(leave, tl.int64) * W
        limit = W * (leave >= low)
        sq = tl.full([BLOCK], 0, tl.float32)
        for dw in range(-left, right + 1):
            src = cols + dw
            v = tl.load(row + src, mask=(src >= 0) & (src < limit), other=0.0).to(tl.float32)
            sq += v * v
        total -= tl.where(sq < float("inf"), sq, 0.0).to(tl.float64)
        nans -= (sq != sq).to(tl.int32)
        infs -= (sq == float("inf")).to(tl.int32)
        out = cols < W * (r >= first)
        centre = base + tl.cast(r, tl.int64) * W + cols
        xc = tl.load(x_ptr + centre, mask=out, other=0.0).to(tl.float32)
        s = tl.where(nans > 0, float("nan"), tl.where(infs > 0, float("inf"), total))
        d = (k + scale * s).to(tl.float32)
        if beta == 0.75:
            root = tl.sqrt_rn(d)
            p = root * tl.sqrt_rn(root)
        else:
            p = tl.exp2(beta * tl.log2(d))
        y = tl.div_rn(xc, p)
        tl.store(y_ptr + centre, y.to(y_ptr.dtype.element_ty), mask=out)
