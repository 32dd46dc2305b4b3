"""ONNX operators into ``ir`` operations, one function per op type, with each opset's forms.

Every function reads one node through ``onnx.OpNode`` and returns the ``ir`` operation (the node
keeps only the inputs the operation takes, in ``OpNode.inputs``) or, for ops whose value is
known at load (Constant, ConstantOfShape of a constant shape), the array itself. A form
lrnserve cannot run raises ``NotRunnable`` (it becomes an ``ir.Unsupported`` node that
``inspect`` lists); a malformed node raises the ``ModelLoadError`` from ``OpNode.error``.
Attribute defaults and forms follow the ONNX operator changelog, opsets 3 to 21.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..models import ir

if TYPE_CHECKING:
    from .onnx import OpNode

MAX_FOLDED_ELEMENTS = 1 << 28  # a ConstantOfShape folded at load: 1 GiB of float32 at most


class NotRunnable(Exception):
    """A node lrnserve cannot run; the message is the reason ``inspect`` shows."""


def _axes_int(values: np.ndarray, node: OpNode, what: str) -> tuple[int, ...]:
    if values.dtype.kind not in "iu" or values.ndim > 1:
        raise node.error(f"{what} must be a 1-D integer tensor, got {values.dtype} of shape {list(values.shape)}")
    return tuple(int(v) for v in values.reshape(-1))


def _scalar(values: np.ndarray, node: OpNode, what: str) -> float:
    if values.size != 1:
        raise node.error(f"{what} must be a scalar, got shape {list(values.shape)}")
    return float(values.reshape(-1)[0])


def _pair(values: tuple[int, ...] | None, default: int, node: OpNode, what: str) -> tuple[int, int]:
    if values is None:
        return default, default
    if len(values) != 2:
        raise NotRunnable(f"{node.op_type}@{node.opset}: {what} {list(values)} is not 2-D; lrnserve runs 2-D only")
    if min(values) < 1:
        raise node.error(f"{what} must be positive, got {list(values)}")
    return values[0], values[1]


def _pads(node: OpNode) -> tuple[ir.Pads, ir.AutoPad]:
    auto_pad = node.attr_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise node.error(f"auto_pad {auto_pad!r} is none of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    pads = node.attr_ints("pads")
    if auto_pad != "NOTSET":
        if auto_pad == "VALID":  # no padding at all: the same as explicit zero pads
            node.details.append(("auto_pad", "VALID"))
            return (0, 0, 0, 0), "NOTSET"
        return (0, 0, 0, 0), auto_pad  # type: ignore[return-value]
    if pads is None:
        return (0, 0, 0, 0), "NOTSET"
    if len(pads) != 4:
        raise NotRunnable(f"{node.op_type}@{node.opset}: pads {list(pads)} are not 2-D; lrnserve runs 2-D only")
    if min(pads) < 0:
        raise node.error(f"pads must not be negative, got {list(pads)}")
    return (pads[0], pads[1], pads[2], pads[3]), "NOTSET"


def conv(node: OpNode) -> ir.Op:
    kernel = node.attr_ints("kernel_shape")
    if kernel is not None:
        _pair(kernel, 1, node, "kernel_shape")
    weight = node.constant(1)
    if weight is not None:
        if weight.ndim != 4:
            raise NotRunnable(f"Conv@{node.opset}: weight of shape {list(weight.shape)} is not 2-D")
        if kernel is not None and tuple(weight.shape[2:]) != kernel:
            raise node.error(f"kernel_shape {list(kernel)} does not match the weight's shape {list(weight.shape)}")
    pads, auto_pad = _pads(node)
    group = node.attr_int("group", 1)
    if group < 1:
        raise node.error(f"group must be positive, got {group}")
    node.keep(0, 1, 2, required=2)
    return ir.Conv(
        stride=_pair(node.attr_ints("strides"), 1, node, "strides"),
        pads=pads,
        dilation=_pair(node.attr_ints("dilations"), 1, node, "dilations"),
        group=group,
        auto_pad=auto_pad,
    )


def _pool(node: OpNode, method: Literal["max", "avg"]) -> ir.Op:
    kernel = node.attr_ints("kernel_shape")
    if kernel is None:
        raise node.error("attribute 'kernel_shape' is required")
    dilations = node.attr_ints("dilations")  # MaxPool from opset 10, AveragePool from 19
    if dilations is not None and any(d != 1 for d in dilations):
        raise NotRunnable(f"{node.op_type}@{node.opset}: dilations {list(dilations)} are not supported (only 1)")
    if method == "max":  # the Indices output and its layout: from opset 8
        if node.attr_int("storage_order", 0) != 0:
            raise NotRunnable(f"MaxPool@{node.opset}: storage_order 1 (column-major Indices) is not supported")
        node.only_first_output("the Indices")
    pads, auto_pad = _pads(node)
    node.keep(0)
    return ir.Pool(
        method=method,
        kernel=_pair(kernel, 1, node, "kernel_shape"),
        stride=_pair(node.attr_ints("strides"), 1, node, "strides"),
        pads=pads,
        ceil=node.opset >= 10 and node.flag("ceil_mode"),
        clip_last_window=True,
        count_include_pad=method == "avg" and node.opset >= 7 and node.flag("count_include_pad"),
        auto_pad=auto_pad,
    )


def global_pool(node: OpNode) -> ir.Op:
    node.keep(0)
    return ir.Pool(method="max" if node.op_type == "GlobalMaxPool" else "avg", global_pool=True)


def lrn(node: OpNode) -> ir.Op:
    if not node.has("size"):
        raise node.error("attribute 'size' is required")
    size = node.attr_int("size", 0)
    if size < 1:
        raise node.error(f"size must be positive, got {size}")
    node.keep(0)
    alpha, beta, bias = node.attr_float("alpha", 1e-4), node.attr_float("beta", 0.75), node.attr_float("bias", 1.0)
    return ir.LRN(size=size, alpha=alpha, beta=beta, k=bias, region="across", extra_neighbour="after")


def gemm(node: OpNode) -> ir.Op:
    node.keep(0, 1, 2, required=2)  # C is required before opset 11; the same maths either way
    return ir.Gemm(
        alpha=node.attr_float("alpha", 1.0),
        beta=node.attr_float("beta", 1.0),
        trans_a=node.flag("transA"),
        trans_b=node.flag("transB"),
    )


def matmul(node: OpNode) -> ir.Op:
    node.keep(0, 1, required=2)
    return ir.MatMul()


_BINARY: dict[str, Literal["add", "sub", "mul", "div", "pow"]] = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
}
_ACTIVATIONS: dict[str, Literal["relu", "sigmoid", "tanh", "identity"]] = {
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Identity": "identity",
}


def binary(node: OpNode) -> ir.Op:
    """Before opset 7, ``broadcast=1`` lets B match A from ``axis`` on (without ``axis``: the
    trailing dims, which is numpy's rule); ``broadcast=0`` needs equal shapes (numpy again)."""
    node.keep(0, 1, required=2)
    legacy_axis = None
    if node.opset < 7 and node.flag("broadcast") and node.has("axis"):
        legacy_axis = node.attr_int("axis", 0)
    return ir.Binary(op=_BINARY[node.op_type], legacy_axis=legacy_axis)


def variadic(node: OpNode) -> ir.Op:
    """Max, Min, Sum: equal shapes before opset 8, numpy broadcasting after (a superset)."""
    if not node.inputs or "" in node.inputs:
        raise node.error("needs at least one input and no empty input names")
    kind: Literal["sum", "max", "min"] = {"Sum": "sum", "Max": "max", "Min": "min"}[node.op_type]  # type: ignore[assignment]
    return ir.Variadic(op=kind)


def concat(node: OpNode) -> ir.Op:
    if node.opset >= 4 and not node.has("axis"):
        raise node.error("attribute 'axis' is required from opset 4")
    if not node.inputs or "" in node.inputs:
        raise node.error("needs at least one input and no empty input names")
    return ir.Concat(axis=node.attr_int("axis", 1))


def dropout(node: OpNode) -> ir.Op:
    """Identity in inference, in every form: ``is_test``/``ratio`` attributes before opset 7,
    ``ratio``/``training_mode`` inputs from 12. Training (random masks) is never served."""
    node.require(1)
    if node.opset >= 12:
        training = node.constant_input(2, "training_mode")
        if training is not None and _scalar(training, node, "training_mode") != 0:
            raise NotRunnable(f"Dropout@{node.opset}: training_mode is true (random dropout is not served)")
        ratio = node.constant(1)
        if ratio is not None and ratio.size == 1:
            node.details.append(("ratio", f"{float(ratio.reshape(-1)[0]):g}"))
    elif node.has("ratio"):
        node.details.append(("ratio", f"{node.attr_float('ratio', 0.5):g}"))
    node.only_first_output("the dropout mask")
    node.keep(0)
    return ir.Activation(op="identity")


def softmax(node: OpNode) -> ir.Op:
    node.keep(0)
    if node.opset < 13:
        return ir.Softmax(axis=node.attr_int("axis", 1), coerce_2d=True)
    return ir.Softmax(axis=node.attr_int("axis", -1), coerce_2d=False)


def reshape(node: OpNode) -> ir.Op:
    node.require(1)
    if node.opset < 5:
        attribute = node.attr_ints("shape")
        if attribute is None:
            raise node.error("attribute 'shape' is required before opset 5")
        shape = attribute
    else:
        node.require(2)
        target = node.constant_input(1, "the target shape")
        assert target is not None
        shape = _axes_int(target, node, "the target shape")
    allowzero = node.opset >= 14 and node.flag("allowzero")
    if sum(1 for d in shape if d == -1) > 1 or any(d < -1 for d in shape):
        raise node.error(f"target shape {list(shape)} has more than one -1 or a dim below -1")
    if allowzero and -1 in shape and 0 in shape:
        raise node.error(f"target shape {list(shape)} has both 0 and -1 with allowzero")
    node.keep(0)
    return ir.Reshape(shape=shape, allowzero=allowzero)


def flatten(node: OpNode) -> ir.Op:
    node.keep(0)
    return ir.Flatten(axis=node.attr_int("axis", 1))


def activation(node: OpNode) -> ir.Op:
    node.keep(0)
    return ir.Activation(op=_ACTIVATIONS[node.op_type])


def leaky_relu(node: OpNode) -> ir.Op:
    node.keep(0)
    return ir.Activation(op="relu", negative_slope=node.attr_float("alpha", 0.01))


def batch_norm(node: OpNode) -> ir.Op:
    """Inference form only: ``spatial=0`` (per-activation statistics, before opset 9) and
    ``training_mode=1`` (from 14) are refused, as is a graph reading the running-statistics
    outputs; ``is_test``/``consumed_inputs`` (before 7) and ``momentum`` do not change the output."""
    if node.has("spatial") and not node.flag("spatial", True):
        raise NotRunnable(f"BatchNormalization@{node.opset}: spatial=0 (per-activation statistics) is not supported")
    if node.opset >= 14 and node.flag("training_mode"):
        raise NotRunnable(f"BatchNormalization@{node.opset}: training_mode=1 is not served")
    node.only_first_output("training statistics")
    node.keep(0, 1, 2, 3, 4, required=5)
    return ir.BatchNorm(epsilon=node.attr_float("epsilon", 1e-5))


def transpose(node: OpNode) -> ir.Op:
    node.keep(0)
    perm = node.attr_ints("perm")
    if perm is not None and sorted(perm) != list(range(len(perm))):
        raise node.error(f"perm {list(perm)} is not a permutation")
    return ir.Transpose(perm=perm)


def squeeze(node: OpNode) -> ir.Op:
    node.require(1)
    if node.opset < 13:
        axes = node.attr_ints("axes")
    else:
        values = node.constant_input(1, "axes")
        axes = None if values is None else _axes_int(values, node, "axes")
    node.keep(0)
    return ir.Squeeze(axes=axes)


def unsqueeze(node: OpNode) -> ir.Op:
    node.require(1)
    if node.opset < 13:
        axes = node.attr_ints("axes")
        if axes is None:
            raise node.error("attribute 'axes' is required before opset 13")
    else:
        node.require(2)
        values = node.constant_input(1, "axes")
        assert values is not None
        axes = _axes_int(values, node, "axes")
    node.keep(0)
    return ir.Unsqueeze(axes=axes)


def clip(node: OpNode) -> ir.Op:
    """Bounds are attributes before opset 11 and optional scalar inputs after; absent: unbounded."""
    node.require(1)
    if node.opset < 11:
        low = node.attr_float("min", 0.0) if node.has("min") else None
        high = node.attr_float("max", 0.0) if node.has("max") else None
    else:
        low_values, high_values = node.constant_input(1, "min"), node.constant_input(2, "max")
        low = None if low_values is None else _scalar(low_values, node, "min")
        high = None if high_values is None else _scalar(high_values, node, "max")
    node.keep(0)
    return ir.Clip(minimum=low, maximum=high)


def constant(node: OpNode) -> ir.Op | np.ndarray:
    """Constant's value forms: ``value`` (all opsets), ``value_float(s)``/``value_int(s)`` from 12."""
    found = [name for name in ("value", "value_float", "value_floats", "value_int", "value_ints") if node.has(name)]
    others = [name for name in ("sparse_value", "value_string", "value_strings") if node.has(name)]
    if others:
        raise NotRunnable(f"Constant@{node.opset}: {others[0]} is not supported")
    if len(found) != 1:
        raise node.error(f"needs exactly one value attribute, found {found or 'none'}")
    name = found[0]
    if name == "value":
        value = node.attr_tensor("value")
        assert value is not None
        return value
    if name == "value_float":
        return np.array(node.attr_float(name, 0.0), dtype=np.float32)
    if name == "value_int":
        return np.array(node.attr_int(name, 0), dtype=np.int64)
    if name == "value_floats":
        return np.array(node.attr_floats(name), dtype=np.float32)
    return np.array(node.attr_ints(name), dtype=np.int64)


def constant_of_shape(node: OpNode) -> ir.Op | np.ndarray:
    """Folded at load when the shape is a constant (the Model Zoo "light" files use it in place
    of every weight); the fill value is a one-element tensor, float32 0 by default."""
    node.require(1)
    value = node.attr_tensor("value")
    if value is None:
        value = np.zeros(1, dtype=np.float32)
    if value.size != 1:
        raise node.error(f"value must have one element, got shape {list(value.shape)}")
    shape_values = node.constant(0)
    if shape_values is None:
        node.keep(0)
        return ir.ConstantOfShape(value=float(value.reshape(-1)[0]), dtype=str(value.dtype))
    shape = _axes_int(shape_values, node, "the shape")
    if any(d < 0 for d in shape):
        raise node.error(f"shape {list(shape)} has a negative dim")
    if math.prod(shape) > MAX_FOLDED_ELEMENTS:
        raise node.error(f"shape {list(shape)} is larger than {MAX_FOLDED_ELEMENTS} elements")
    return np.full(shape, value.reshape(-1)[0], dtype=value.dtype)


TRANSLATIONS: dict[str, Callable[[OpNode], Any]] = {
    "Conv": conv,
    "MaxPool": lambda node: _pool(node, "max"),
    "AveragePool": lambda node: _pool(node, "avg"),
    "GlobalAveragePool": global_pool,
    "GlobalMaxPool": global_pool,
    "LRN": lrn,
    "Gemm": gemm,
    "MatMul": matmul,
    **dict.fromkeys(_BINARY, binary),
    "Max": variadic,
    "Min": variadic,
    "Sum": variadic,
    "Concat": concat,
    "Dropout": dropout,
    "Softmax": softmax,
    "Reshape": reshape,
    "Flatten": flatten,
    "Relu": activation,
    "Sigmoid": activation,
    "Tanh": activation,
    "Identity": activation,
    "LeakyRelu": leaky_relu,
    "BatchNormalization": batch_norm,
    "Transpose": transpose,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Clip": clip,
    "Constant": constant,
    "ConstantOfShape": constant_of_shape,
}
SUPPORTED_OPS = tuple(sorted(TRANSLATIONS))


def translate(node: OpNode) -> ir.Op | np.ndarray:
    """The node's ir operation or value; ``NotRunnable`` for an op or form lrnserve cannot run."""
    translation = TRANSLATIONS.get(node.op_type)
    if translation is None:
        raise NotRunnable(
            f"ONNX op {node.op_type} (opset {node.opset}) is not supported; lrnserve runs {', '.join(SUPPORTED_OPS)}"
        )
    result: ir.Op | np.ndarray = translation(node)
    return result
