"""Caffe layer types as model-IR nodes: parameters, output shapes, learned blobs.

Each translator reads one layer's parameters as Caffe's own ``LayerSetUp``/``Reshape`` do (the
same defaults, the same refusals), computes the output shape (the weights' expected shapes
depend on it) and emits nodes through a ``LayerContext``. ``caffe`` reads the files and decides
which layers run; this module knows what each type means.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np
from google.protobuf.message import Message

from ..models import ir
from .pb import caffe_pb2

Shape = tuple[int, ...]
Pair = tuple[int, int]
Partial = tuple[int | None, ...]  # an expected blob shape; None: a dim the net does not fix
M = TypeVar("M", bound=Message)
P = caffe_pb2.PoolingParameter
LRNP = caffe_pb2.LRNParameter
ELT = caffe_pb2.EltwiseParameter


@dataclass(frozen=True)
class Layer:
    """One layer of either format, V1 types already given their V2 names."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    message: caffe_pb2.LayerParameter | caffe_pb2.V1LayerParameter
    v1: bool = False

    @property
    def source(self) -> str:
        return f"{self.type} (V1)" if self.v1 else self.type

    def describe(self) -> str:
        return f"layer {self.name!r} ({self.source})"

    def param(self, field: str, kind: builtins.type[M]) -> M:
        """The layer's ``field`` parameters; defaults where its format has no such field."""
        if field in self.message.DESCRIPTOR.fields_by_name:
            value = getattr(self.message, field)
            if isinstance(value, kind):
                return value
        return kind()


@dataclass(frozen=True)
class BlobSpec:
    """A learned blob a layer takes: its role (for messages), expected shape, and the seeded
    random initialisation used when no caffemodel is given."""

    role: str
    shape: Partial | None
    init: Literal["uniform", "zeros", "ones"] = "uniform"
    fan_in: int = 1


class Builder(Protocol):
    """What translators need from the graph being built (``caffe.GraphBuilder``)."""

    def layer_blobs(self, layer: Layer, specs: Sequence[BlobSpec]) -> list[np.ndarray] | None: ...
    def add_constant(self, name: str, array: np.ndarray) -> str: ...
    def add_node(
        self,
        layer: Layer,
        op: ir.Op,
        inputs: Sequence[str],
        shape: Shape | None,
        *,
        top: bool,
        suffix: str = "",
        details: tuple[tuple[str, str], ...] = (),
    ) -> str: ...
    def layer_error(self, layer: Layer, message: str) -> ir.ModelLoadError: ...


class LayerContext:
    """One layer being translated: its resolved input values and their shapes."""

    def __init__(self, builder: Builder, layer: Layer, inputs: list[str], shapes: list[Shape | None]) -> None:
        self.builder, self.layer, self.inputs, self.shapes = builder, layer, inputs, shapes

    def error(self, message: str) -> ir.ModelLoadError:
        return self.builder.layer_error(self.layer, message)

    def expect(self, bottoms: tuple[int, int], tops: int = 1) -> None:
        low, high = bottoms
        if not low <= len(self.layer.bottoms) <= high:
            wanted = str(low) if low == high else f"{low} to {high}" if high < 99 else f"at least {low}"
            raise self.error(f"has {len(self.layer.bottoms)} bottoms, {self.layer.type} takes {wanted}")
        if len(self.layer.tops) != tops:
            raise self.error(f"has {len(self.layer.tops)} tops, {self.layer.type} makes {tops}")

    def rank4(self) -> Shape | None:
        shape = self.shapes[0]
        if shape is not None and len(shape) != 4:
            raise self.error(f"needs a 4-D (N, C, H, W) input, got shape {show(shape)}")
        return shape

    def axis(self, axis: int) -> int:
        """Caffe's CanonicalAxisIndex against the first input."""
        shape = self.shapes[0]
        if shape is None:
            return axis
        rank = len(shape)
        if not -rank <= axis < rank:
            raise self.error(f"axis {axis} is out of range for an input of shape {show(shape)}")
        return axis % rank if axis < 0 else axis

    def blobs(self, specs: Sequence[BlobSpec]) -> list[np.ndarray] | None:
        return self.builder.layer_blobs(self.layer, specs)

    def constant(self, role: str, array: np.ndarray) -> str:
        return self.builder.add_constant(f"{self.layer.name}/{role}", array)

    def constants(self, specs: Sequence[BlobSpec]) -> list[str]:
        arrays = self.blobs(specs)
        return [] if arrays is None else [self.constant(s.role, a) for s, a in zip(specs, arrays, strict=True)]

    def output(
        self, op: ir.Op, inputs: Sequence[str], shape: Shape | None, details: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.builder.add_node(self.layer, op, inputs, shape, top=True, details=details)

    def unsupported(self, reason: str) -> None:
        self.builder.add_node(self.layer, ir.Unsupported(reason), self.inputs, None, top=True)


def show(shape: Partial | None) -> str:
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def num(value: float) -> float:
    """A float32 parameter as the number the file spells (1e-4, not 9.99999974e-05)."""
    return float(str(np.float32(value)))


def _pair(values: Sequence[int], h: int | None, w: int | None, default: int, what: str, ctx: LayerContext) -> Pair:
    """Convolution's repeated field (one value, or one per spatial axis) or its _h/_w pair."""
    if h is not None or w is not None:
        if values:
            raise ctx.error(f"give {what} or {what}_h/{what}_w, not both")
        return (h or 0, w or 0)
    if not values:
        return (default, default)
    if len(values) == 1:
        return (int(values[0]), int(values[0]))
    if len(values) == 2:
        return (int(values[0]), int(values[1]))
    raise ctx.error(f"has {len(values)} {what} values for 2 spatial axes")


def _has(message: Message, field: str) -> bool:
    return message.HasField(field)


def _opt(message: Message, field: str) -> int | None:
    return int(getattr(message, field)) if _has(message, field) else None


def convolution(ctx: LayerContext) -> None:
    p = ctx.layer.param("convolution_param", caffe_pb2.ConvolutionParameter)
    ctx.expect((1, 1))
    x = ctx.shapes[0]
    if p.axis != 1 or (x is not None and len(x) != 4):
        return ctx.unsupported("only 2-D convolution over axis 1 of an (N, C, H, W) input is supported")
    kernel = _pair(p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), 0, "kernel_size", ctx)
    stride = _pair(p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), 1, "stride", ctx)
    pad = _pair(p.pad, _opt(p, "pad_h"), _opt(p, "pad_w"), 0, "pad", ctx)
    dilation = _pair(p.dilation, None, None, 1, "dilation", ctx)
    if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0:
        raise ctx.error(f"kernel {kernel}, stride {stride} and dilation {dilation} must be positive")
    out, group = int(p.num_output), int(p.group)
    if out <= 0 or group <= 0 or out % group:
        raise ctx.error(f"num_output {out} must be a positive multiple of group {group}")
    channels = None if x is None else x[1]
    if channels is not None and channels % group:
        raise ctx.error(f"input channels {channels} are not divisible by group {group}")
    per_group = None if channels is None else channels // group
    fan_in = (per_group or 1) * kernel[0] * kernel[1]
    specs = [BlobSpec("weight", (out, per_group, *kernel), fan_in=fan_in)]
    if p.bias_term:
        specs.append(BlobSpec("bias", (out,), fan_in=fan_in))
    shape = None
    if x is not None:
        size = [(x[2 + i] + 2 * pad[i] - (dilation[i] * (kernel[i] - 1) + 1)) // stride[i] + 1 for i in (0, 1)]
        if min(size) <= 0:
            raise ctx.error(f"the output of an input of shape {show(x)} would be empty")
        shape = (x[0], out, size[0], size[1])
    op = ir.Conv(stride=stride, pads=(pad[0], pad[1], pad[0], pad[1]), dilation=dilation, group=group)
    ctx.output(op, [ctx.inputs[0], *ctx.constants(specs)], shape)


def _pool_pair(p: caffe_pb2.PoolingParameter, field: str, default: int, ctx: LayerContext) -> Pair:
    """Pooling's single field or its _h/_w pair (both required), as PoolingLayer::LayerSetUp checks."""
    stem = field.removesuffix("_size")
    h, w = f"{stem}_h", f"{stem}_w"
    if _has(p, h) or _has(p, w):
        if _has(p, field) or not (_has(p, h) and _has(p, w)):
            raise ctx.error(f"give {field}, or both {h} and {w}")
        return (int(getattr(p, h)), int(getattr(p, w)))
    value = int(getattr(p, field)) if _has(p, field) else default
    return (value, value)


def pool_extent(size: int, kernel: int, stride: int, pad: int, ceil: bool, clip: bool) -> int:
    """Caffe's pooled size (pooling_layer.cpp): ceil or floor, then the padded-last-window rule."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if clip and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pooling(ctx: LayerContext) -> None:
    p = ctx.layer.param("pooling_param", P)
    ctx.expect((1, 1))
    x = ctx.rank4()
    if p.global_pooling:
        if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise ctx.error("global_pooling takes no kernel size")
        kernel: Pair = (x[2], x[3]) if x is not None else (1, 1)
    else:
        if not p.HasField("kernel_size") and not (p.HasField("kernel_h") and p.HasField("kernel_w")):
            raise ctx.error("needs kernel_size, or both kernel_h and kernel_w")
        kernel = _pool_pair(p, "kernel_size", 0, ctx)
    pad = _pool_pair(p, "pad", 0, ctx)
    stride = _pool_pair(p, "stride", 1, ctx)
    if min(kernel) <= 0 or min(stride) <= 0:
        raise ctx.error(f"kernel {kernel} and stride {stride} must be positive")
    if p.global_pooling and (max(pad) or stride != (1, 1)):
        raise ctx.error("global_pooling takes only pad 0 and stride 1")
    if not p.global_pooling and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
        raise ctx.error(f"pad {pad} must be smaller than the kernel {kernel}")
    ceil, clip = p.round_mode == P.CEIL, max(pad) > 0
    shape = None
    if x is not None:
        size = [pool_extent(x[2 + i], kernel[i], stride[i], pad[i], ceil, clip) for i in (0, 1)]
        if min(size) <= 0:
            raise ctx.error(f"the output of an input of shape {show(x)} would be empty")
        shape = (x[0], x[1], size[0], size[1])
    if p.pool == P.STOCHASTIC:
        return ctx.unsupported("Pooling with pool: STOCHASTIC (random, a training-time method) is not supported")
    method: Literal["max", "avg"] = "max" if p.pool == P.MAX else "avg"
    op = ir.Pool(
        method,
        kernel=kernel,
        stride=stride,
        pads=(pad[0], pad[1], pad[0], pad[1]),
        ceil=ceil,
        clip_last_window=clip,
        count_include_pad=method == "avg",
        global_pool=bool(p.global_pooling),
    )
    ctx.output(op, ctx.inputs, shape)


def lrn(ctx: LayerContext) -> None:
    p = ctx.layer.param("lrn_param", LRNP)
    ctx.expect((1, 1))
    x = ctx.rank4()
    size = int(p.local_size)
    if size % 2 == 0:
        raise ctx.error(f"local_size {size} is even; Caffe takes only odd sizes")
    alpha, beta, k = num(p.alpha), num(p.beta), num(p.k)
    if p.norm_region == LRNP.WITHIN_CHANNEL:
        op = ir.LRN(size, alpha, beta, 1.0, "within")
        note = (("k", f"{k:g} in the file, ignored: Caffe's WITHIN_CHANNEL always adds 1"),)
        return ctx.output(op, ctx.inputs, x, note)
    ctx.output(ir.LRN(size, alpha, beta, k, "across"), ctx.inputs, x)


def _elementwise(op: ir.Op) -> Callable[[LayerContext], None]:
    def translate(ctx: LayerContext) -> None:
        ctx.expect((1, 1))
        ctx.output(op, ctx.inputs, ctx.shapes[0])

    return translate


def relu(ctx: LayerContext) -> None:
    slope = num(ctx.layer.param("relu_param", caffe_pb2.ReLUParameter).negative_slope)
    _elementwise(ir.Activation("relu", slope))(ctx)


def softmax(ctx: LayerContext) -> None:
    ctx.expect((1, 1))
    axis = ctx.axis(ctx.layer.param("softmax_param", caffe_pb2.SoftmaxParameter).axis)
    ctx.output(ir.Softmax(axis, coerce_2d=False), ctx.inputs, ctx.shapes[0])


def concat(ctx: LayerContext) -> None:
    p = ctx.layer.param("concat_param", caffe_pb2.ConcatParameter)
    ctx.expect((1, 99))
    if p.HasField("concat_dim") and p.HasField("axis"):
        raise ctx.error("give axis or the legacy concat_dim, not both")
    axis = int(p.concat_dim) if p.HasField("concat_dim") else ctx.axis(p.axis)
    shape = None
    if all(s is not None for s in ctx.shapes):
        first = ctx.shapes[0]
        assert first is not None
        for other in ctx.shapes[1:]:
            assert other is not None
            if len(other) != len(first) or any(
                a != b for i, (a, b) in enumerate(zip(first, other, strict=True)) if i != axis
            ):
                raise ctx.error(f"inputs of shapes {show(first)} and {show(other)} differ off axis {axis}")
        if axis >= len(first):
            raise ctx.error(f"axis {axis} is out of range for inputs of shape {show(first)}")
        total = sum(s[axis] for s in ctx.shapes if s is not None)
        shape = (*first[:axis], total, *first[axis + 1 :])
    ctx.output(ir.Concat(axis), ctx.inputs, shape)


def flatten(ctx: LayerContext) -> None:
    p = ctx.layer.param("flatten_param", caffe_pb2.FlattenParameter)
    ctx.expect((1, 1))
    axis, end = ctx.axis(p.axis), ctx.axis(p.end_axis)
    x, shape = ctx.shapes[0], None
    if x is not None:
        shape = (*x[:axis], math.prod(x[axis : end + 1]), *x[end + 1 :])
    ctx.output(ir.Flatten(axis, end), ctx.inputs, shape)


def inner_product(ctx: LayerContext) -> None:
    p = ctx.layer.param("inner_product_param", caffe_pb2.InnerProductParameter)
    ctx.expect((1, 1))
    axis, out, x = ctx.axis(p.axis), int(p.num_output), ctx.shapes[0]
    if out <= 0:
        raise ctx.error(f"num_output {out} must be positive")
    fan_in = None if x is None else math.prod(x[axis:])
    weight: Partial = (fan_in, out) if p.transpose else (out, fan_in)
    specs = [BlobSpec("weight", weight, fan_in=fan_in or 1)]
    if p.bias_term:
        specs.append(BlobSpec("bias", (out,), fan_in=fan_in or 1))
    shape = None if x is None else (*x[:axis], out)
    ctx.output(ir.InnerProduct(axis, bool(p.transpose)), [ctx.inputs[0], *ctx.constants(specs)], shape)


def eltwise(ctx: LayerContext) -> None:
    p = ctx.layer.param("eltwise_param", ELT)
    ctx.expect((2, 99))
    coefficients = tuple(num(c) for c in p.coeff) or None
    if coefficients is not None and p.operation != ELT.SUM:
        raise ctx.error("takes coefficients (coeff) only for operation SUM")
    if coefficients is not None and len(coefficients) != len(ctx.inputs):
        raise ctx.error(f"has {len(coefficients)} coefficients for {len(ctx.inputs)} bottoms")
    known = [s for s in ctx.shapes if s is not None]
    if any(s != known[0] for s in known):
        raise ctx.error(f"inputs have different shapes: {', '.join(show(s) for s in known)}")
    kind: Literal["sum", "prod", "max"] = {ELT.SUM: "sum", ELT.PROD: "prod", ELT.MAX: "max"}[p.operation]  # type: ignore[assignment]
    ctx.output(ir.Variadic(kind, coefficients), ctx.inputs, ctx.shapes[0])


def batch_norm(ctx: LayerContext) -> None:
    p = ctx.layer.param("batch_norm_param", caffe_pb2.BatchNormParameter)
    ctx.expect((1, 1))
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ctx.error("use_global_stats: false normalizes with each batch's statistics (training behaviour)")
    x = ctx.shapes[0]
    if x is not None and len(x) < 2:
        raise ctx.error(f"needs an input with a channel axis, got shape {show(x)}")
    channels = None if x is None else x[1]
    specs = [BlobSpec("mean", (channels,), "zeros"), BlobSpec("variance", (channels,), "ones")]
    arrays = ctx.blobs([*specs, BlobSpec("factor", (1,), "ones")])
    inputs = [ctx.inputs[0]]
    if arrays is not None:
        mean, variance, factor = arrays
        scale = 0.0 if factor[0] == 0 else 1.0 / float(factor[0])
        c = mean.shape[0]
        inputs += [
            ctx.constant("scale", np.ones(c, np.float32)),
            ctx.constant("bias", np.zeros(c, np.float32)),
            ctx.constant("mean", (mean * scale).astype(np.float32)),
            ctx.constant("variance", (variance * scale).astype(np.float32)),
        ]
    ctx.output(ir.BatchNorm(num(p.eps)), inputs, x)


def scale(ctx: LayerContext) -> None:
    p = ctx.layer.param("scale_param", caffe_pb2.ScaleParameter)
    ctx.expect((1, 2))
    x, axis = ctx.shapes[0], ctx.axis(p.axis)
    if p.num_axes < -1:
        raise ctx.error(f"num_axes {p.num_axes} must be -1 (all axes from axis) or more")
    factor: Partial | None
    if len(ctx.inputs) == 2:
        given = ctx.shapes[1]
        if x is not None and given is not None and x[axis : axis + len(given)] != given:
            raise ctx.error(f"scale input of shape {show(given)} does not match input {show(x)} from axis {axis}")
        factor = given
    elif x is None:
        factor = None if p.num_axes == -1 else (None,) * p.num_axes
    else:
        if p.num_axes >= 0 and axis + p.num_axes > len(x):
            raise ctx.error(f"num_axes {p.num_axes} does not fit an input of shape {show(x)} from axis {axis}")
        factor = x[axis:] if p.num_axes == -1 else x[axis : axis + p.num_axes]
    specs = [] if len(ctx.inputs) == 2 else [BlobSpec("scale", factor, "ones")]
    if p.bias_term:
        specs.append(BlobSpec("bias", factor, "zeros"))
    names = ctx.constants(specs)
    if specs and not names:  # shapes unknown downstream of an unsupported layer: nothing to run anyway
        return ctx.unsupported("the scale's shape is unknown")
    multiplier = ctx.inputs[1] if len(ctx.inputs) == 2 else names[0]
    legacy = None if factor == () else axis
    mul = ir.Binary("mul", legacy_axis=legacy)
    if not p.bias_term:
        return ctx.output(mul, [ctx.inputs[0], multiplier], x)
    scaled = ctx.builder.add_node(ctx.layer, mul, [ctx.inputs[0], multiplier], x, top=False, suffix="scaled")
    ctx.output(ir.Binary("add", legacy_axis=legacy), [scaled, names[-1]], x)


TRANSLATORS: dict[str, Callable[[LayerContext], None]] = {
    "BatchNorm": batch_norm,
    "Concat": concat,
    "Convolution": convolution,
    "Dropout": _elementwise(ir.Activation("identity")),
    "Eltwise": eltwise,
    "Flatten": flatten,
    "InnerProduct": inner_product,
    "LRN": lrn,
    "Pooling": pooling,
    "ReLU": relu,
    "Scale": scale,
    "Sigmoid": _elementwise(ir.Activation("sigmoid")),
    "Softmax": softmax,
    "TanH": _elementwise(ir.Activation("tanh")),
}
# Handled by the importer itself: Input (the graph's input) and Split (aliases of its bottom).
SUPPORTED = tuple(sorted([*TRANSLATORS, "Input", "Split"]))
