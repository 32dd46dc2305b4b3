"""torch implementations of the format-neutral operations (``ir``), one function per kind.

Each ``step`` takes the node's inputs in order (constants already tensors; an absent optional
input is None) and returns its outputs' first value. Pooling implements the one rule in
``ir.Pool`` exactly; where PyTorch's own pooling computes the same thing (symmetric pads and
the same output size) it is used as is, because padding a copy costs a pass over the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import LocalResponseNorm, LRNParams
from . import ir
from .base import LRNFactory, max_pool2d, torch_pool_size

Step = Callable[..., torch.Tensor]


def pool_output_size(extent: int, kernel: int, stride: int, begin: int, end: int, op: ir.Pool) -> int:
    """Output length along one axis (ir.Pool's rule)."""
    span = extent + begin + end - kernel
    out = (-(-span // stride) if op.ceil else span // stride) + 1  # ceil: one clipped window may remain
    if op.ceil and op.clip_last_window and (out - 1) * stride >= extent + begin:
        out -= 1
    if out < 1:
        raise ValueError(f"kernel {kernel} is larger than the padded input {extent + begin + end}")
    return out


def same_pads(extent: int, kernel: int, stride: int, dilation: int, mode: str) -> tuple[int, int]:
    """ONNX auto_pad: begin/end pads making the output ``ceil(extent / stride)`` long."""
    if mode == "VALID":
        return 0, 0
    out = -(-extent // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - extent, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


class PoolStep(nn.Module):
    """ir.Pool on [N, C, H, W]; the AVE divisor map is cached per input size and dtype."""

    def __init__(self, op: ir.Pool) -> None:
        super().__init__()
        self.op = op
        self._divisors: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor | None] = {}

    def _geometry(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], ir.Pads]:
        op = self.op
        if op.global_pool:
            return (h, w), (1, 1), (0, 0, 0, 0)
        (kh, kw), (sh, sw) = op.kernel, op.stride
        if op.auto_pad != "NOTSET":
            top, bottom = same_pads(h, kh, sh, 1, op.auto_pad)
            left, right = same_pads(w, kw, sw, 1, op.auto_pad)
            return op.kernel, op.stride, (top, left, bottom, right)
        return op.kernel, op.stride, op.pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw), (top, left, bottom, right) = self._geometry(h, w)
        out_h = pool_output_size(h, kh, sh, top, bottom, self.op)
        out_w = pool_output_size(w, kw, sw, left, right, self.op)
        if (
            top == bottom
            and left == right
            and top <= kh // 2
            and left <= kw // 2
            and torch_pool_size(h, kh, sh, top, self.op.ceil) == out_h
            and torch_pool_size(w, kw, sw, left, self.op.ceil) == out_w
        ):
            if self.op.method == "max":  # oneDNN on the CPU: 4-17x torch's NCHW pooling (base.max_pool2d)
                return max_pool2d(x, (kh, kw), (sh, sw), (top, left), ceil_mode=self.op.ceil)
            return F.avg_pool2d(
                x, (kh, kw), (sh, sw), (top, left), ceil_mode=self.op.ceil, count_include_pad=self.op.count_include_pad
            )
        # The general case: pad (or crop) to exactly the extent the windows cover, then pool.
        pad_bottom = (out_h - 1) * sh + kh - h - top
        pad_right = (out_w - 1) * sw + kw - w - left
        fill = -math.inf if self.op.method == "max" else 0.0
        padded = F.pad(x, (left, pad_right, top, pad_bottom), value=fill)
        if self.op.method == "max":
            return max_pool2d(padded, (kh, kw), (sh, sw))
        sums = F.avg_pool2d(padded, (kh, kw), (sh, sw)) * (kh * kw)
        divisor = self._divisor(x, (h, w), (kh, kw), (sh, sw), (top, left, bottom, right), (out_h, out_w))
        return sums / divisor

    def _divisor(
        self,
        x: torch.Tensor,
        size: tuple[int, int],
        kernel: tuple[int, int],
        stride: tuple[int, int],
        pads: ir.Pads,
        out: tuple[int, int],
    ) -> torch.Tensor:
        key = (size[0], size[1], x.dtype, x.device)
        cached = self._divisors.get(key)
        if cached is None:
            counts = [
                self._counts(size[axis], kernel[axis], stride[axis], pads[axis], pads[axis + 2], out[axis])
                for axis in (0, 1)
            ]
            cached = (counts[0][:, None] * counts[1][None, :]).to(device=x.device, dtype=x.dtype)
            self._divisors[key] = cached
        return cached

    def _counts(self, extent: int, kernel: int, stride: int, begin: int, end: int, out: int) -> torch.Tensor:
        starts = torch.arange(out, dtype=torch.float64) * stride - begin
        if self.op.count_include_pad:
            low, high = starts, torch.clamp(starts + kernel, max=extent + end)
        else:
            low, high = torch.clamp(starts, min=0), torch.clamp(starts + kernel, max=extent)
        return torch.clamp(high - low, min=1)


class LRNStep(nn.Module):
    """ir.LRN through lrnserve's fused kernel; ONNX's even window is PyTorch's mirrored, so the
    normalized axes are flipped around the kernel."""

    def __init__(self, op: ir.LRN, factory: LRNFactory) -> None:
        super().__init__()
        self.norm = factory(LRNParams(op.size, op.alpha, op.beta, op.k, op.region))
        mirrored = op.size % 2 == 0 and op.extra_neighbour == "after"
        self.flip: tuple[int, ...] = ((1,) if op.region == "across" else (2, 3)) if mirrored else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flip:
            return self.norm(x)  # type: ignore[no-any-return]
        return torch.flip(self.norm(torch.flip(x, self.flip)), self.flip)


def conv(op: ir.Conv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    top, left, bottom, right = op.pads
    if op.auto_pad != "NOTSET":
        kh, kw = weight.shape[-2:]
        top, bottom = same_pads(x.shape[-2], kh, op.stride[0], op.dilation[0], op.auto_pad)
        left, right = same_pads(x.shape[-1], kw, op.stride[1], op.dilation[1], op.auto_pad)
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, op.stride, (top, left), op.dilation, op.group)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, op.stride, 0, op.dilation, op.group)


def gemm(op: ir.Gemm, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    a = a.t() if op.trans_a else a
    b = b.t() if op.trans_b else b
    y = a @ b
    if op.alpha != 1.0:
        y = y * op.alpha
    if c is not None:
        y = y + (c * op.beta if op.beta != 1.0 else c)
    return y


def inner_product(
    op: ir.InnerProduct, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    flat = x.reshape(*x.shape[: op.axis], -1)
    return F.linear(flat, weight.t() if op.transpose else weight, bias)


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "max": torch.maximum,
    "min": torch.minimum,
}


def binary(op: ir.Binary, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if op.legacy_axis is not None:
        axis = op.legacy_axis % a.dim() if a.dim() else 0
        b = b.reshape(*b.shape, *([1] * (a.dim() - axis - b.dim())))
    return _BINARY[op.op](a, b)


_VARIADIC: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add,
    "prod": torch.mul,
    "max": torch.maximum,
    "min": torch.minimum,
}


def variadic(op: ir.Variadic, *inputs: torch.Tensor) -> torch.Tensor:
    terms: Sequence[torch.Tensor] = inputs
    if op.coefficients is not None:
        terms = [t * c if c != 1.0 else t for t, c in zip(inputs, op.coefficients, strict=True)]
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _VARIADIC[op.op]
    result = terms[0]
    for term in terms[1:]:
        result = reduce(result, term)
    return result


def activation(op: ir.Activation, x: torch.Tensor) -> torch.Tensor:
    if op.op == "relu":
        return F.leaky_relu(x, op.negative_slope) if op.negative_slope else F.relu(x)
    if op.op == "sigmoid":
        return torch.sigmoid(x)
    if op.op == "tanh":
        return torch.tanh(x)
    return x


def softmax(op: ir.Softmax, x: torch.Tensor) -> torch.Tensor:
    axis = op.axis % x.dim()
    if not op.coerce_2d:
        return torch.softmax(x, dim=axis)
    return torch.softmax(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)


def flatten(op: ir.Flatten, x: torch.Tensor) -> torch.Tensor:
    if op.end_axis is None:
        axis = op.axis + x.dim() if op.axis < 0 else op.axis
        return x.reshape(math.prod(x.shape[:axis]), -1)
    return torch.flatten(x, op.axis, op.end_axis)


def reshape(op: ir.Reshape, x: torch.Tensor) -> torch.Tensor:
    target = [x.shape[i] if (d == 0 and not op.allowzero) else d for i, d in enumerate(op.shape)]
    return x.reshape(target)


def squeeze(op: ir.Squeeze, x: torch.Tensor) -> torch.Tensor:
    if op.axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in op.axes))


def unsqueeze(op: ir.Unsqueeze, x: torch.Tensor) -> torch.Tensor:
    rank = x.dim() + len(op.axes)
    for axis in sorted(a % rank for a in op.axes):
        x = x.unsqueeze(axis)
    return x


def batch_norm(
    op: ir.BatchNorm, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=op.epsilon)


def clip(op: ir.Clip, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, op.minimum, op.maximum)


def constant_of_shape(op: ir.ConstantOfShape, shape: torch.Tensor) -> torch.Tensor:
    dtype = {"float32": torch.float32, "int64": torch.int64}.get(op.dtype, torch.float32)
    return torch.full([int(d) for d in shape.tolist()], op.value, dtype=dtype)


def transpose(op: ir.Transpose, x: torch.Tensor) -> torch.Tensor:
    return x.permute(op.perm if op.perm is not None else tuple(reversed(range(x.dim()))))


def step_for(op: ir.Op, lrn_factory: LRNFactory | None = None) -> Step:
    """The callable computing ``op``; a module where the op keeps state (LRN, pooling caches)."""
    if isinstance(op, ir.Unsupported):
        raise ValueError(op.reason)
    if isinstance(op, ir.Pool):
        return PoolStep(op)
    if isinstance(op, ir.LRN):
        return LRNStep(op, lrn_factory or LocalResponseNorm.from_params)
    if isinstance(op, ir.MatMul):
        return torch.matmul
    if isinstance(op, ir.Concat):
        return lambda *xs: torch.cat(xs, dim=op.axis)
    functions: dict[type, Callable[..., torch.Tensor]] = {
        ir.Conv: conv,
        ir.Gemm: gemm,
        ir.InnerProduct: inner_product,
        ir.Binary: binary,
        ir.Variadic: variadic,
        ir.Activation: activation,
        ir.Clip: clip,
        ir.Softmax: softmax,
        ir.Flatten: flatten,
        ir.Reshape: reshape,
        ir.Transpose: transpose,
        ir.Squeeze: squeeze,
        ir.Unsqueeze: unsqueeze,
        ir.BatchNorm: batch_norm,
        ir.ConstantOfShape: constant_of_shape,
    }
    return partial(functions[type(op)], op)
