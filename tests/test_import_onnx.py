"""The ONNX importer: every operator form it accepts, run by lrnserve and compared with
onnxruntime; the Model Zoo graphs with random weights; and every way a file can be refused.

References are never lrnserve code: onnxruntime runs each graph (opsets below 7, which it does
not run, after onnx's version converter or as an explicitly written opset-7 graph), and the
even-size LRN that onnxruntime refuses is written out in basic ONNX ops."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_files import (
    light_path,
    light_with_weights,
    lrn_in_basic_ops,
    model,
    ort_run,
    relative_error,
    single,
    upgraded,
)

from lrnserve.server.importers.onnx import parse_model, read_model
from lrnserve.server.models import ir
from lrnserve.server.models.runtime import GraphNetwork

RNG = np.random.default_rng(20260)
TOLERANCE = 1e-4


def rand(*shape: int, low: float | None = None) -> np.ndarray:
    values = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(values) + np.float32(low) if low is not None else values


def load(built: onnx.ModelProto | bytes, origin: str = "test.onnx") -> ir.Graph:
    return parse_model(built if isinstance(built, bytes) else built.SerializeToString(), origin)


def run_lrnserve(built: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    net = GraphNetwork(load(built))
    net.eval()
    with torch.inference_mode():
        return net(torch.from_numpy(x)).numpy()


def assert_matches(built: onnx.ModelProto, shape: tuple[int, ...], reference: onnx.ModelProto | None = None) -> None:
    x = rand(*shape) * 3
    expected = ort_run(reference if reference is not None else built, x)
    actual = run_lrnserve(built, x)
    assert relative_error(actual, expected) < TOLERANCE


X4 = (2, 4, 9, 11)
W = {"w": rand(6, 4, 3, 3), "b": rand(6)}
WG = {"w": rand(6, 2, 3, 3), "b": rand(6)}


def _legacy_add(b: np.ndarray, axis: int | None, opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Add with opset < 7 broadcasting, and the same maths written at opset 7: B reshaped to
    align with A from ``axis`` (ONNX's Add-6 text)."""
    attributes = {"broadcast": 1, **({"axis": axis} if axis is not None else {})}
    old = single("Add", X4, opset, ["b"], {"b": b}, **attributes)
    trailing = 4 - (axis if axis is not None else 4 - b.ndim) - b.ndim
    new = single("Add", X4, 7, ["b"], {"b": b.reshape(*b.shape, *[1] * trailing)})
    return old, new


def _case(built: onnx.ModelProto, shape: tuple[int, ...] = X4, reference: onnx.ModelProto | None = None) -> tuple:
    return (built, shape, reference)


ADD6, ADD6_REFERENCE = _legacy_add(rand(4, 9), 1, 6)
ADD3, ADD3_REFERENCE = _legacy_add(rand(1, 4), 0, 3)
ADD6_SUFFIX, ADD6_SUFFIX_REFERENCE = _legacy_add(rand(11), None, 6)
BN = {k: rand(4, low=0.5) if k in "sv" else rand(4) for k in "sbmv"}
DROPOUT6 = single("Dropout", X4, 6, is_test=1, ratio=0.3)
BN6 = single("BatchNormalization", X4, 6, ["s", "b", "m", "v"], BN, is_test=1, epsilon=1e-3, momentum=0.8)
BN5 = single("BatchNormalization", X4, 5, ["s", "b", "m", "v"], BN, is_test=1, consumed_inputs=[0, 0, 0, 1, 1])
RELU3 = single("Relu", X4, 3, consumed_inputs=[0])
MUL6 = single("Mul", (1, 4, 9, 11), 6, ["c"], {"c": rand(1, 4, 9, 11)})
SUM6 = single("Sum", (1, 4, 9, 11), 6, ["c"], {"c": rand(1, 4, 9, 11)})
# Declared batch 1: lrnserve cannot prove a transposed batch axis keeps samples apart, and a
# graph declaring a larger batch it cannot prove is refused (test_graph_that_depends_...).
GEMM_TRANS_A = model(
    [helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("Gemm", ["xt", "w"], ["y"], transA=1)],
    [("x", [1, 5])],
    [("y", None)],
    {"w": rand(5, 3)},
    opset=11,
)
GEMM6 = model(
    [helper.make_node("Gemm", ["x", "w", "c"], ["y"], broadcast=1, transB=1, alpha=0.5)],
    [("x", [4, 5])],
    [("y", None)],
    {"w": rand(3, 5), "c": rand(3)},
    opset=6,
)
CONCAT3 = single("Concat", (1, 4, 9, 11), 3, ["c"], {"c": rand(1, 3, 9, 11)})
CLIP6 = single("Clip", X4, 6, min=-0.5, max=0.7)

OPERATORS = {
    # Conv: explicit asymmetric pads, every auto_pad kind, group, dilation, no bias, opset 3 to 21
    "conv3-pads": _case(single("Conv", X4, 3, ["w", "b"], W, pads=[1, 0, 2, 1], strides=[2, 1])),
    "conv9-same-upper": _case(single("Conv", X4, 9, ["w", "b"], W, auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv11-same-lower": _case(single("Conv", X4, 11, ["w"], W, auto_pad="SAME_LOWER", strides=[2, 3])),
    "conv21-valid-group": _case(single("Conv", X4, 21, ["w", "b"], WG, auto_pad="VALID", group=2)),
    "conv13-dilation-group": _case(
        single("Conv", X4, 13, ["w"], WG, group=2, dilations=[2, 2], kernel_shape=[3, 3], pads=[2, 1, 0, 3])
    ),
    # pooling: asymmetric pads, ceil_mode (from 10), auto_pad, count_include_pad (from 7)
    "maxpool8-pads": _case(single("MaxPool", X4, 8, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])),
    "maxpool10-ceil": _case(single("MaxPool", X4, 10, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "maxpool12-ceil-pads": _case(
        single("MaxPool", X4, 12, kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 1, 1], ceil_mode=1)
    ),
    "maxpool11-same-upper": _case(
        single("MaxPool", X4, 11, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    ),
    "maxpool11-same-lower": _case(
        single("MaxPool", X4, 11, kernel_shape=[2, 4], strides=[2, 3], auto_pad="SAME_LOWER")
    ),
    "maxpool21-valid": _case(single("MaxPool", X4, 21, kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID")),
    "maxpool12-unused-indices": _case(single("MaxPool", X4, 12, outputs=("y", "indices"), kernel_shape=[2, 2])),
    "avgpool7-exclude-pad": _case(single("AveragePool", X4, 7, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avgpool7-include-pad": _case(
        single("AveragePool", X4, 7, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 2, 1], count_include_pad=1)
    ),
    "avgpool10-ceil-include-pad": _case(
        single(
            "AveragePool",
            X4,
            10,
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 0, 1, 0],
            ceil_mode=1,
            count_include_pad=1,
        )
    ),
    "avgpool11-same-upper-include-pad": _case(
        single("AveragePool", X4, 11, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=1)
    ),
    "avgpool19-ceil-asymmetric": _case(
        single("AveragePool", X4, 19, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 0], ceil_mode=1)
    ),
    "avgpool19-same-lower": _case(
        single("AveragePool", X4, 19, kernel_shape=[2, 3], strides=[3, 2], auto_pad="SAME_LOWER")
    ),
    "maxpool12-ceil-last-window-in-pad": _case(
        single("MaxPool", (2, 4, 10, 10), 12, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
        (2, 4, 10, 10),
    ),
    "avgpool19-ceil-last-window-in-pad": _case(
        single("AveragePool", (2, 4, 10, 10), 19, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
        (2, 4, 10, 10),
    ),
    "avgpool19-ceil-past-the-end-include-pad": _case(
        single(
            "AveragePool", (2, 4, 10, 10), 19, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, count_include_pad=1
        ),
        (2, 4, 10, 10),
    ),
    "avgpool11-ceil-pads-include-pad": _case(
        single(
            "AveragePool",
            (2, 4, 10, 10),
            11,
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            ceil_mode=1,
            count_include_pad=1,
        ),
        (2, 4, 10, 10),
    ),
    "global-avgpool9": _case(single("GlobalAveragePool", X4, 9)),
    "global-maxpool21": _case(single("GlobalMaxPool", X4, 21)),
    # LRN (odd sizes: onnxruntime's own; even sizes below)
    "lrn9-size3": _case(single("LRN", X4, 9, size=3, alpha=0.5, beta=0.6, bias=2.0)),
    "lrn13-size5-defaults": _case(single("LRN", X4, 13, size=5)),
    # Gemm and MatMul
    "gemm13-transB-alpha-beta": _case(
        single("Gemm", (4, 5), 13, ["w", "c"], {"w": rand(3, 5), "c": rand(3)}, transB=1, alpha=0.5, beta=2.0),
        (4, 5),
    ),
    "gemm11-transA-no-C": _case(GEMM_TRANS_A, (1, 5)),
    "gemm9-2d-C": _case(single("Gemm", (4, 5), 9, ["w", "c"], {"w": rand(5, 3), "c": rand(1, 3)}, beta=0.3), (4, 5)),
    "gemm6-broadcast": _case(GEMM6, (4, 5), upgraded(GEMM6, 7)),
    "matmul13-3d": _case(single("MatMul", (2, 3, 4), 13, ["w"], {"w": rand(4, 5)}), (2, 3, 4)),
    "matmul9-2d": _case(single("MatMul", (3, 4), 9, ["w"], {"w": rand(4, 2)}), (3, 4)),
    # elementwise, with numpy broadcasting from opset 7 and the legacy broadcast attributes before
    "add14": _case(single("Add", X4, 14, ["c"], {"c": rand(4, 1, 1)})),
    "sub13": _case(single("Sub", X4, 13, ["c"], {"c": rand(11)})),
    "mul7": _case(single("Mul", X4, 7, ["c"], {"c": rand(1, 4, 9, 1)})),
    "div13": _case(single("Div", X4, 13, ["c"], {"c": rand(4, 1, 1, low=0.5)})),
    "pow15": _case(single("Pow", X4, 15, ["c"], {"c": np.array([1.0, 2.0, 3.0, 2.0], np.float32).reshape(4, 1, 1)})),
    "add6-legacy-axis": _case(ADD6, X4, ADD6_REFERENCE),
    "add3-legacy-axis0": _case(ADD3, X4, ADD3_REFERENCE),
    "add6-legacy-suffix": _case(ADD6_SUFFIX, X4, ADD6_SUFFIX_REFERENCE),
    "mul6-same-shape": _case(MUL6, (1, 4, 9, 11), upgraded(MUL6, 7)),
    "relu3-consumed-inputs": _case(RELU3, X4, upgraded(RELU3, 7)),
    "sum13-variadic": _case(single("Sum", X4, 13, ["c", "d"], {"c": rand(4, 1, 1), "d": rand(11)})),
    "sum6-same-shapes": _case(SUM6, (1, 4, 9, 11)),
    "max8": _case(single("Max", X4, 8, ["c"], {"c": rand(9, 1)})),
    "min13": _case(single("Min", X4, 13, ["c", "d"], {"c": rand(4, 1, 1), "d": rand(1, 11)})),
    # Concat: axis default 1 before opset 4, negative from 11
    "concat3-default-axis": _case(CONCAT3, (1, 4, 9, 11), upgraded(CONCAT3, 7)),
    "concat4": _case(single("Concat", (1, 4, 9, 11), 4, ["c"], {"c": rand(1, 4, 2, 11)}, axis=2), (1, 4, 9, 11)),
    "concat11-negative": _case(single("Concat", X4, 11, ["x"], axis=-1)),
    "concat13-constant": _case(
        single("Concat", (1, 4, 9, 11), 13, ["c"], {"c": rand(1, 4, 9, 3)}, axis=3), (1, 4, 9, 11)
    ),
    # Dropout forms (identity in inference)
    "dropout6-is-test": _case(DROPOUT6, X4, upgraded(DROPOUT6, 7)),
    "dropout7-unused-mask": _case(single("Dropout", X4, 7, outputs=("y", "mask"), ratio=0.2)),
    "dropout10": _case(single("Dropout", X4, 10)),
    "dropout12-ratio-training-false": _case(
        single(
            "Dropout", X4, 12, ["r", "t"], {"r": np.array(0.4, np.float32), "t": np.array(False)}, outputs=("y", "m")
        )
    ),
    "dropout13-absent-ratio": _case(single("Dropout", X4, 13, ["", "t"], {"t": np.array(False)})),
    # Softmax: 2-D coercion around axis before opset 13, per axis from 13
    "softmax11-default-axis": _case(single("Softmax", X4, 11)),
    "softmax11-axis2": _case(single("Softmax", X4, 11, axis=2)),
    "softmax11-axis-negative": _case(single("Softmax", X4, 11, axis=-2)),
    "softmax3": _case(single("Softmax", (2, 10), 3), (2, 10)),
    "softmax13-default-axis": _case(single("Softmax", X4, 13)),
    "softmax13-axis1": _case(single("Softmax", X4, 13, axis=1)),
    # Reshape: shape attribute before 5, input after; 0 and -1; allowzero from 14
    "reshape3-attribute": _case(single("Reshape", X4, 3, shape=[2, 4, 99])),
    "reshape5-zero-minus-one": _case(single("Reshape", X4, 5, ["s"], {"s": np.array([0, -1], np.int64)})),
    "reshape13-zero-middle": _case(single("Reshape", X4, 13, ["s"], {"s": np.array([0, 4, -1, 3], np.int64)})),
    "reshape14-allowzero": _case(single("Reshape", X4, 14, ["s"], {"s": np.array([2, 36, 11], np.int64)}, allowzero=1)),
    # Flatten (negative axes from 11)
    "flatten9-axis2": _case(single("Flatten", (1, 1, 9, 11), 9, axis=2), (1, 1, 9, 11)),
    "flatten3-default": _case(single("Flatten", X4, 3)),
    "flatten11-negative-axis": _case(single("Flatten", X4, 11, axis=-3)),
    "flatten11-axis0": _case(single("Flatten", (1, 4, 9, 11), 11, axis=0), (1, 4, 9, 11)),
    # activations
    "relu6": _case(single("Relu", X4, 6)),
    "relu14": _case(single("Relu", X4, 14)),
    "leakyrelu6-default": _case(single("LeakyRelu", X4, 6)),
    "leakyrelu16-alpha": _case(single("LeakyRelu", X4, 16, alpha=0.2)),
    "sigmoid6": _case(single("Sigmoid", X4, 6)),
    "tanh13": _case(single("Tanh", X4, 13)),
    "identity21": _case(single("Identity", X4, 21)),
    # BatchNormalization: opset 6 attributes against 9 and 15
    "batchnorm5-consumed-inputs": _case(BN5, X4, upgraded(BN5, 7)),
    "batchnorm6-is-test": _case(BN6, X4, upgraded(BN6, 7)),
    "batchnorm7-spatial": _case(single("BatchNormalization", X4, 7, ["s", "b", "m", "v"], BN, spatial=1)),
    "batchnorm9": _case(single("BatchNormalization", X4, 9, ["s", "b", "m", "v"], BN, epsilon=0.01)),
    "batchnorm15-inference": _case(single("BatchNormalization", X4, 15, ["s", "b", "m", "v"], BN, training_mode=0)),
    # Transpose, Squeeze, Unsqueeze (axes attribute before 13, input from 13)
    "transpose13-perm": _case(single("Transpose", X4, 13, perm=[0, 2, 3, 1])),
    "transpose3-reverse": _case(single("Transpose", (1, 3, 4, 1), 3), (1, 3, 4, 1)),
    "squeeze11-negative-attr": _case(single("Squeeze", (2, 1, 3, 1), 11, axes=[-1]), (2, 1, 3, 1)),
    "squeeze13-input": _case(single("Squeeze", (2, 1, 3, 1), 13, ["a"], {"a": np.array([1], np.int64)}), (2, 1, 3, 1)),
    "unsqueeze9-attr": _case(single("Unsqueeze", (2, 3), 9, axes=[1, 3]), (2, 3)),
    "unsqueeze11-negative": _case(single("Unsqueeze", (2, 3), 11, axes=[-1]), (2, 3)),
    "unsqueeze13-input": _case(single("Unsqueeze", (2, 3), 13, ["a"], {"a": np.array([1, 2], np.int64)}), (2, 3)),
    # Clip: attributes before 11, optional inputs after (an empty name is absent)
    "clip6-both": _case(CLIP6),
    "clip6-min-only": _case(single("Clip", X4, 6, min=0.1)),
    "clip11-min-input": _case(single("Clip", X4, 11, ["lo"], {"lo": np.array(-0.2, np.float32)})),
    "clip13-max-only": _case(single("Clip", X4, 13, ["", "hi"], {"hi": np.array(0.3, np.float32)})),
    "clip12-both": _case(
        single("Clip", X4, 12, ["lo", "hi"], {"lo": np.array(-1.0, np.float32), "hi": np.array(0.5, np.float32)})
    ),
}


@pytest.mark.parametrize(("built", "shape", "reference"), list(OPERATORS.values()), ids=list(OPERATORS))
def test_operator_matches_onnxruntime(
    built: onnx.ModelProto, shape: tuple[int, ...], reference: onnx.ModelProto | None
) -> None:
    assert_matches(built, shape, reference)


def _constant(name: str, **value: object) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", **value)


CONSTANT_GRAPHS = {
    "value-tensor": (
        9,
        [_constant("c", value=numpy_helper.from_array(rand(4, 1, 1))), helper.make_node("Add", ["x", "c"], ["y"])],
    ),
    "value-float": (12, [_constant("c", value_float=2.5), helper.make_node("Mul", ["x", "c"], ["y"])]),
    "value-floats": (
        13,
        [
            _constant("c", value_floats=[1.0, -2.0, 0.5, 3.0] * 2 + [1.0] * 3),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
    ),
    "value-ints-reshape": (
        13,
        [_constant("s", value_ints=[0, -1, 11]), helper.make_node("Reshape", ["x", "s"], ["y"])],
    ),
    "value-int-pow": (15, [_constant("p", value_int=3), helper.make_node("Pow", ["x", "p"], ["y"])]),
    "constant-of-shape": (
        13,
        [
            _constant("shape", value=numpy_helper.from_array(np.array([4, 1, 1], np.int64))),
            helper.make_node(
                "ConstantOfShape", ["shape"], ["c"], value=numpy_helper.from_array(np.array([0.5], np.float32))
            ),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
    ),
    "constant-of-shape-default": (
        9,
        [
            _constant("shape", value=numpy_helper.from_array(np.array([11], np.int64))),
            helper.make_node("ConstantOfShape", ["shape"], ["c"]),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
    ),
}


@pytest.mark.parametrize(("opset", "nodes"), list(CONSTANT_GRAPHS.values()), ids=list(CONSTANT_GRAPHS))
def test_constants_are_folded_and_match_onnxruntime(opset: int, nodes: list[onnx.NodeProto]) -> None:
    built = model(nodes, [("x", list(X4))], [("y", None)], opset=opset)
    graph = load(built)
    assert not any(node.source.startswith(("Constant@", "ConstantOfShape@")) for node in graph.nodes)
    assert_matches(built, X4)


@pytest.mark.parametrize("size", [2, 4])
def test_even_lrn_follows_onnx_window(size: int) -> None:
    shape = (2, 7, 5, 6)
    built = single("LRN", shape, 13, size=size, alpha=0.3, beta=0.75, bias=1.5)
    (node,) = load(built).nodes
    assert node.op == ir.LRN(size=size, alpha=pytest.approx(0.3), beta=0.75, k=1.5, extra_neighbour="after")
    assert_matches(built, shape, reference=lrn_in_basic_ops(shape, size, 0.3, 0.75, 1.5))


def test_lrn_reference_in_basic_ops_agrees_with_onnxruntime() -> None:
    """The written-out LRN is right where onnxruntime's LRN can check it (odd sizes)."""
    shape = (2, 7, 5, 6)
    x = rand(*shape) * 3
    for size in (3, 5):
        expected = ort_run(single("LRN", shape, 13, size=size, alpha=0.3, beta=0.75, bias=1.5), x)
        assert relative_error(ort_run(lrn_in_basic_ops(shape, size, 0.3, 0.75, 1.5), x), expected) < 1e-6
    with pytest.raises(Exception, match=r"size_ % 2 == 1"):  # why the test above needs the written-out LRN
        ort_run(single("LRN", shape, 13, size=2), x)


BATCH_SPANNING = {
    "gemm-full-C": (single("Gemm", (4, 5), 9, ["w", "c"], {"w": rand(5, 3), "c": rand(4, 3)}), (4, 5)),
    "gemm-transA": (single("Gemm", (5, 5), 11, ["w"], {"w": rand(5, 3)}, transA=1), (5, 5)),
    "mul-constant-of-batch-2": (single("Mul", X4, 13, ["c"], {"c": rand(*X4)}), X4),
    "squeeze-all": (single("Squeeze", (2, 1, 3, 1), 13), (2, 1, 3, 1)),
}


@pytest.mark.parametrize(("built", "shape"), list(BATCH_SPANNING.values()), ids=list(BATCH_SPANNING))
def test_graph_that_depends_on_its_declared_batch_is_refused(built: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    """A graph whose constants span a declared batch of 2+ cannot answer requests of another
    size as the file defines it: a one-line load error naming the node, not wrong answers."""
    graph = load(built)
    with pytest.raises(ir.ModelLoadError) as caught:
        GraphNetwork(graph)
    message = str(caught.value)
    assert "\n" not in message and f"declares batch {shape[0]}" in message
    assert f"node '{graph.nodes[0].name}'" in message and "cannot be served apart" in message


def test_graph_not_proven_batch_safe_runs_per_sample_at_any_batch() -> None:
    """Transposing the batch axis away and back (Gemm with transA) keeps samples apart, but
    only a run proves it: lrnserve runs such a file one sample at a time, still correctly."""
    built = model(
        [helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("Gemm", ["xt", "w", "c"], ["y"], transA=1)],
        [("x", [1, 5])],
        [("y", [1, 3])],
        {"w": rand(5, 3), "c": rand(3)},
        opset=13,
    )
    net = GraphNetwork(load(built))
    net.eval()
    assert net.per_sample is not None and "Transpose" in net.per_sample
    x = rand(3, 5)
    with torch.inference_mode():
        actual = net(torch.from_numpy(x)).numpy()
    expected = np.concatenate([ort_run(built, x[i : i + 1]) for i in range(3)])
    assert relative_error(actual, expected) < TOLERANCE


def test_constant_of_shape_of_a_computed_shape_stays_a_node() -> None:
    nodes = [
        *_computed("shape", np.array([4, 1, 1], np.int64)),
        helper.make_node("ConstantOfShape", ["shape"], ["c"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
    ]
    (_, node, _) = load(_with(nodes, helper.make_node("Add", ["x", "cf"], ["y"]))).nodes[:3]
    assert node.op == ir.ConstantOfShape(value=2.0, dtype="int64") and node.inputs == ("shape",)


# --- the Model Zoo graphs ---------------------------------------------------------------------
# name -> input scale: the Caffe-trained nets see 0..255 pixels less the mean (so LRN acts), the
# batch-normalized ones unit-scale inputs.
LIGHT_MODELS = {
    "bvlc_alexnet": 50.0,
    "inception_v1": 50.0,
    "zfnet512": 50.0,
    "resnet50": 1.0,
    "vgg19": 50.0,
    "squeezenet": 50.0,
    "densenet121": 1.0,
    "inception_v2": 1.0,
    "shufflenet": 1.0,
}


@pytest.mark.parametrize("name", list(LIGHT_MODELS))
def test_model_zoo_graph_with_random_weights_matches_onnxruntime(name: str) -> None:
    """N=1 against onnxruntime, and N=3 (the files declare batch 1) against onnxruntime run
    one sample at a time; every one of these graphs keeps its samples apart, so it batches.
    VGG-19, the largest by far (20 GFLOP a sample), checks N=1 only, to keep the file fast."""
    scale = LIGHT_MODELS[name]
    data, reference = light_with_weights(name, 0, scale)
    graph = load(data, f"light_{name}.onnx")
    assert not list(graph.unsupported())
    net = GraphNetwork(graph)
    net.eval()
    assert net.input_shape == (3, 224, 224)
    assert net.per_sample is None
    batch = 1 if name == "vgg19" else 3
    x = (np.random.default_rng(7).standard_normal((batch, 3, 224, 224)) * scale).astype(np.float32)
    with torch.inference_mode():
        one = net(torch.from_numpy(x[:1])).numpy()
        together = net(torch.from_numpy(x)).numpy() if batch > 1 else one
    expected = np.concatenate([ort_run(reference, x[i : i + 1]) for i in range(batch)])
    assert relative_error(one, expected[:1]) < TOLERANCE
    assert relative_error(together, expected) < TOLERANCE
    if graph.nodes[-1].op == ir.Softmax(axis=1, coerce_2d=True):  # the check is not of a saturated softmax
        assert 0.01 < float(expected.max()) < 0.9


def test_light_alexnet_as_shipped() -> None:
    graph = read_model(light_path("bvlc_alexnet"))
    assert (graph.name, graph.format, graph.origin) == ("bvlc_alexnet", "onnx", str(light_path("bvlc_alexnet")))
    assert graph.input == ir.Tensor("data_0", "data_0", (1, 3, 224, 224))
    assert graph.output == ir.Tensor("prob_1", "prob_1", (1, 1000))
    assert [node.source for node in graph.nodes[:4]] == ["Conv@9", "Relu@9", "LRN@9", "MaxPool@9"]
    lrn_nodes = [node for node in graph.nodes if isinstance(node.op, ir.LRN)]
    assert [node.op for node in lrn_nodes] == [ir.LRN(5, pytest.approx(1e-4), 0.75, 1.0, "across", "after")] * 2
    pool = next(node.op for node in graph.nodes if node.name == "n14")
    assert pool == ir.Pool("max", (3, 3), (2, 2), (0, 0, 1, 1))
    assert next(node.op for node in graph.nodes if node.source == "Reshape@9") == ir.Reshape((1, 9216))
    assert not any(node.source.startswith("ConstantOfShape") for node in graph.nodes)
    assert graph.parameter_count() == 60_965_224
    weight = graph.constants["conv1_w_0"]
    assert weight.shape == (96, 3, 11, 11) and weight.dtype == np.float32 and np.all(weight == np.float32(0.02))
    assert "conv1_w_0__SHAPE" not in graph.constants  # only what the nodes read


# --- graph-level translation ------------------------------------------------------------------
def test_initializers_listed_as_inputs_are_constants_and_symbolic_dims_are_none() -> None:
    built = model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        [("x", ["N", 4, 9, 11])],
        [("y", ["N", 6, 7, 9])],
        W,
        opset=7,
        ir_version=3,
    )
    assert len(built.graph.input) == 3
    graph = load(built)
    assert graph.input == ir.Tensor("x", "x", (None, 4, 9, 11))
    assert graph.output == ir.Tensor("y", "y", (None, 6, 7, 9))
    assert set(graph.constants) == {"w", "b"}
    x = rand(3, 4, 9, 11)
    assert relative_error(run_lrnserve(built, x), ort_run(built, x)) < TOLERANCE


def test_nodes_are_put_in_execution_order_with_stable_fallback_names() -> None:
    nodes = [
        helper.make_node("Relu", ["a"], ["y"]),
        helper.make_node("Mul", ["x", "c"], ["a"]),
        _constant("c", value=numpy_helper.from_array(rand(4, 1, 1))),
    ]
    built = model(nodes, [("x", list(X4))], [("y", None)])
    graph = load(built)
    assert [(node.name, node.source) for node in graph.nodes] == [("Mul_1", "Mul@13"), ("Relu_0", "Relu@13")]
    ordered = model([nodes[2], nodes[1], nodes[0]], [("x", list(X4))], [("y", None)])
    x = rand(*X4)
    assert relative_error(run_lrnserve(built, x), ort_run(ordered, x)) < TOLERANCE


def _tensor(onnx_tensor: onnx.TensorProto) -> np.ndarray:
    from lrnserve.server.importers.onnx import tensor_to_array
    from lrnserve.server.importers.pb import onnx_pb2

    ours = onnx_pb2.TensorProto()
    ours.ParseFromString(onnx_tensor.SerializeToString())
    return tensor_to_array(ours, "test.onnx")


@pytest.mark.parametrize(
    ("data_type", "values", "raw"),
    [
        (TensorProto.FLOAT, [1.5, -2.25, 3.0, 0.0, 7.0, 1e-3], False),
        (TensorProto.FLOAT, [1.5, -2.25, 3.0, 0.0, 7.0, 1e-3], True),
        (TensorProto.DOUBLE, [1.5, -2.25, 3.0, 0.0, 7.0, 1e30], False),
        (TensorProto.DOUBLE, [1.5, -2.25, 3.0, 0.0, 7.0, 1e-30], True),
        (TensorProto.FLOAT16, [1.5, -2.25, 3.0, 0.0, 7.0, 65504.0], False),
        (TensorProto.FLOAT16, [1.5, -2.25, 3.0, 0.0, 7.0, 1e-3], True),
        (TensorProto.BFLOAT16, [1.5, -2.25, 3.0, 0.0, 7.0, 256.0], False),
        (TensorProto.INT8, [1, -2, 3, 0, 7, -128], False),
        (TensorProto.UINT8, [1, 2, 3, 0, 7, 255], True),
        (TensorProto.INT16, [1, -2, 3, 0, 7, -32768], False),
        (TensorProto.UINT16, [1, 2, 3, 0, 7, 65535], False),
        (TensorProto.INT32, [1, -2, 3, 0, 7, -(2**31)], False),
        (TensorProto.INT32, [1, -2, 3, 0, 7, 2**31 - 1], True),
        (TensorProto.INT64, [1, -2, 3, 0, 7, -(2**62)], False),
        (TensorProto.INT64, [1, -2, 3, 0, 7, 2**62], True),
        (TensorProto.UINT32, [1, 2, 3, 0, 7, 2**32 - 1], False),
        (TensorProto.UINT64, [1, 2, 3, 0, 7, 2**40], False),
        (TensorProto.BOOL, [True, False, True, True, False, False], False),
    ],
)
def test_tensor_data_in_every_storage_form(data_type: int, values: list, raw: bool) -> None:
    dtype = helper.tensor_dtype_to_np_dtype(data_type)
    if raw:
        tensor = helper.make_tensor("t", data_type, [2, 3], np.array(values, dtype=dtype).tobytes(), raw=True)
    else:
        tensor = helper.make_tensor("t", data_type, [2, 3], values)
    expected = numpy_helper.to_array(tensor).astype(
        np.float32 if np.dtype(dtype).kind == "f" or data_type == TensorProto.BFLOAT16 else np.int64
    )
    actual = _tensor(tensor)
    assert actual.dtype == expected.dtype and actual.shape == (2, 3)
    np.testing.assert_array_equal(actual, expected)


def test_scalar_and_empty_tensors() -> None:
    assert _tensor(numpy_helper.from_array(np.array(2.5, np.float32))).shape == ()
    assert _tensor(helper.make_tensor("e", TensorProto.FLOAT, [0, 3], [])).shape == (0, 3)


def _node_op(built: onnx.ModelProto, name: str) -> ir.Op:
    return next(node.op for node in load(built).nodes if node.name == name)


def test_translated_parameters() -> None:
    """Parameters the numeric tests cannot see (equal outputs either way) or that only inspect shows."""
    assert _node_op(
        single("Reshape", X4, 14, ["s"], {"s": np.array([2, 0, 99], np.int64)}, allowzero=1), "reshape_node"
    ) == ir.Reshape((2, 0, 99), allowzero=True)
    assert _node_op(
        single("Reshape", X4, 13, ["s"], {"s": np.array([2, 0, 99], np.int64)}, allowzero=1), "reshape_node"
    ) == ir.Reshape((2, 0, 99), allowzero=False)  # no allowzero before opset 14
    assert _node_op(single("MaxPool", X4, 9, kernel_shape=[2, 2], ceil_mode=1), "maxpool_node") == ir.Pool(
        "max", (2, 2)
    )
    assert _node_op(
        single("AveragePool", X4, 6, kernel_shape=[2, 2], count_include_pad=1), "averagepool_node"
    ) == ir.Pool("avg", (2, 2))
    assert _node_op(ADD6, "add_node") == ir.Binary("add", legacy_axis=1)
    assert _node_op(ADD6_SUFFIX, "add_node") == ir.Binary("add")
    assert _node_op(single("Add", X4, 7, ["c"], {"c": rand(4, 1, 1)}, broadcast=1, axis=1), "add_node") == ir.Binary(
        "add"
    )
    assert _node_op(single("Softmax", X4, 12), "softmax_node") == ir.Softmax(axis=1, coerce_2d=True)
    assert _node_op(single("Softmax", X4, 13), "softmax_node") == ir.Softmax(axis=-1, coerce_2d=False)
    assert _node_op(single("Flatten", X4, 11, axis=-3), "flatten_node") == ir.Flatten(axis=-3)
    assert _node_op(single("Conv", X4, 11, ["w"], W, auto_pad="VALID", pads=[1, 1, 1, 1]), "conv_node") == ir.Conv()
    dropout = next(node for node in load(single("Dropout", X4, 7, outputs=("y", "m"), ratio=0.2)).nodes)
    assert dropout.outputs == ("y",) and dropout.details == (("ratio", "0.2"),)


# --- what lrnserve cannot run: Unsupported nodes, refused with one line when building ---------
def _computed(name: str, value: np.ndarray) -> list[onnx.NodeProto]:
    """``name`` computed at run time from a constant (an Identity the importer does not fold)."""
    return [
        _constant(f"{name}_c", value=numpy_helper.from_array(value)),
        helper.make_node("Identity", [f"{name}_c"], [name]),
    ]


def _with(
    nodes: list[onnx.NodeProto], op: onnx.NodeProto, opset: int = 13, shape: tuple[int, ...] = X4, **init: np.ndarray
) -> onnx.ModelProto:
    return model([*nodes, op], [("x", list(shape))], [(op.output[0], None)], dict(init), opset)


UNSUPPORTED = {
    "unknown-op": (
        single("Foo", X4, 13),
        "Foo@13",
        r"ONNX op Foo \(opset 13\) is not supported; lrnserve runs .*LRN, .*Tanh",
    ),
    "other-domain": (
        model(
            [helper.make_node("Gelu", ["x"], ["y"], name="gelu_node", domain="com.microsoft")],
            [("x", list(X4))],
            [("y", None)],
        ),
        "com.microsoft.Gelu@0",
        r"ONNX op Gelu of domain 'com.microsoft' is not supported",
    ),
    "opset-22": (single("Relu", X4, 22), "Relu@22", r"ONNX op Relu at opset 22: lrnserve supports opsets 3 to 21"),
    "opset-2": (single("Relu", X4, 2), "Relu@2", r"at opset 2: lrnserve supports opsets 3 to 21"),
    "reshape-computed-target": (
        _with(
            _computed("s", np.array([0, -1], np.int64)),
            helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape_node"),
        ),
        "Reshape@13",
        r"Reshape@13: the target shape \('s'\) must be a constant",
    ),
    "squeeze-computed-axes": (
        _with(
            _computed("a", np.array([1], np.int64)), helper.make_node("Squeeze", ["x", "a"], ["y"], name="squeeze_node")
        ),
        "Squeeze@13",
        r"axes \('a'\) must be a constant",
    ),
    "unsqueeze-computed-axes": (
        _with(
            _computed("a", np.array([1], np.int64)),
            helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="unsqueeze_node"),
        ),
        "Unsqueeze@13",
        r"axes \('a'\) must be a constant",
    ),
    "clip-computed-min": (
        _with(
            _computed("lo", np.array(0.0, np.float32)),
            helper.make_node("Clip", ["x", "lo"], ["y"], name="clip_node"),
            11,
        ),
        "Clip@11",
        r"min \('lo'\) must be a constant",
    ),
    "maxpool-dilations": (
        single("MaxPool", X4, 10, kernel_shape=[2, 2], dilations=[2, 2]),
        "MaxPool@10",
        r"dilations \[2, 2\]",
    ),
    "maxpool-storage-order": (
        single("MaxPool", X4, 8, kernel_shape=[2, 2], storage_order=1),
        "MaxPool@8",
        "storage_order",
    ),
    "maxpool-indices-used": (
        _with(
            [helper.make_node("MaxPool", ["x"], ["p", "i"], name="maxpool_node", kernel_shape=[2, 2])],
            helper.make_node("Cast", ["i"], ["y"], to=1),
        ),
        "MaxPool@13",
        r"output 'i' \(the Indices\) is used",
    ),
    "maxpool-3d": (
        single("MaxPool", (1, 2, 4, 4, 4), 13, kernel_shape=[2, 2, 2]),
        "MaxPool@13",
        r"kernel_shape \[2, 2, 2\] is not 2-D",
    ),
    "avgpool-dilations": (
        single("AveragePool", X4, 19, kernel_shape=[2, 2], dilations=[1, 2]),
        "AveragePool@19",
        "dilations",
    ),
    "conv-1d": (
        single("Conv", (2, 4, 9), 13, ["w"], {"w": rand(6, 4, 3)}),
        "Conv@13",
        r"weight of shape \[6, 4, 3\] is not 2-D",
    ),
    "batchnorm-spatial-0": (
        single("BatchNormalization", X4, 7, ["s", "b", "m", "v"], BN, spatial=0),
        "BatchNormalization@7",
        "spatial=0",
    ),
    "batchnorm-training": (
        single("BatchNormalization", X4, 15, ["s", "b", "m", "v"], BN, training_mode=1),
        "BatchNormalization@15",
        "training_mode=1",
    ),
    "batchnorm-statistics-used": (
        _with(
            [
                helper.make_node(
                    "BatchNormalization", ["x", "s", "b", "m", "v"], ["n", "mean"], name="batchnormalization_node"
                )
            ],
            helper.make_node("Add", ["n", "mean"], ["y"]),
            9,
            **BN,
        ),
        "BatchNormalization@9",
        r"output 'mean' \(training statistics\) is used",
    ),
    "dropout-mask-used": (
        _with(
            [helper.make_node("Dropout", ["x"], ["d", "mask"], name="dropout_node")],
            helper.make_node("Cast", ["mask"], ["y"], to=1),
            10,
        ),
        "Dropout@10",
        r"output 'mask' \(the dropout mask\) is used",
    ),
    "dropout-training": (
        single("Dropout", X4, 12, ["", "t"], {"t": np.array(True)}),
        "Dropout@12",
        "training_mode is true",
    ),
    "dropout-computed-training": (
        _with(
            _computed("t", np.array(False)), helper.make_node("Dropout", ["x", "", "t"], ["y"], name="dropout_node"), 13
        ),
        "Dropout@13",
        r"training_mode \('t'\) must be a constant",
    ),
    "constant-string": (
        _with(
            [helper.make_node("Constant", [], ["s"], name="constant_node", value_strings=["a"])],
            helper.make_node("Identity", ["x"], ["y"]),
        ),
        "Constant@13",
        "value_strings is not supported",
    ),
}


@pytest.mark.parametrize(("built", "source", "reason"), list(UNSUPPORTED.values()), ids=list(UNSUPPORTED))
def test_unsupported_node_is_kept_and_refused_in_one_line(built: onnx.ModelProto, source: str, reason: str) -> None:
    graph = load(built)
    node = next(node for node in graph.unsupported() if node.source == source)  # first (a Cast may follow)
    assert isinstance(node.op, ir.Unsupported)
    assert re.search(reason, node.op.reason), node.op.reason
    with pytest.raises(ir.ModelLoadError) as refused:
        GraphNetwork(graph)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"test.onnx: node '{node.name}' ({source}): ")


# --- files that cannot be served: one line naming the file and the node -----------------------
def _mutated(built: onnx.ModelProto, change) -> bytes:  # type: ignore[no-untyped-def]
    copy = onnx.ModelProto()
    copy.CopyFrom(built)
    change(copy)
    return copy.SerializeToString()


RELU = single("Relu", X4, 13)
CONV = single("Conv", X4, 13, ["w", "b"], W)


def _set_attribute(name: str, attribute: onnx.AttributeProto):  # type: ignore[no-untyped-def]
    def change(built: onnx.ModelProto) -> None:
        node = built.graph.node[0]
        node.attribute.append(attribute)

    return change


def _external(built: onnx.ModelProto) -> None:
    tensor = built.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")


def _short_raw(built: onnx.ModelProto) -> None:
    built.graph.initializer[0].raw_data = built.graph.initializer[0].raw_data[:-4]


def _string_initializer(built: onnx.ModelProto) -> None:
    built.graph.initializer.append(helper.make_tensor("names", TensorProto.STRING, [1], [b"a"]))


def _cycle(built: onnx.ModelProto) -> None:
    del built.graph.node[:]
    built.graph.node.extend(
        [
            helper.make_node("Relu", ["b"], ["a"], name="first"),
            helper.make_node("Add", ["x", "a"], ["b"], name="second"),
        ]
    )
    built.graph.output[0].name = "b"


LOAD_ERRORS = {
    "random-bytes": (np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes(), r"not an ONNX model"),
    "empty-file": (b"", r"not an ONNX model \(no graph"),
    "text-file": (b'name: "AlexNet"\nlayer { name: "data" type: "Input" }\n', r"not an ONNX model"),
    "truncated": (light_path("bvlc_alexnet").read_bytes()[:2000], r"not an ONNX model"),
    "undefined-input": (
        _mutated(RELU, lambda m: m.graph.node[0].input.__setitem__(0, "ghost")),
        r"node 'relu_node' \(Relu\): input 'ghost' is not defined anywhere in the graph",
    ),
    "two-outputs": (
        _mutated(RELU, lambda m: m.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))),
        r"exactly one output, this one has 2: 'y', 'x'",
    ),
    "two-inputs": (
        _mutated(RELU, lambda m: m.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))),
        r"exactly one data input, this one has 2: 'x', 'z'",
    ),
    "no-input": (
        _mutated(RELU, lambda m: m.graph.ClearField("input")),
        r"exactly one data input, this one has 0: none",
    ),
    "integer-input": (
        _mutated(RELU, lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.INT64)),
        r"graph input 'x' has element type INT64",
    ),
    "no-opset-import": (_mutated(RELU, lambda m: m.ClearField("opset_import")), r"no opset_import"),
    "no-default-domain": (
        _mutated(RELU, lambda m: setattr(m.opset_import[0], "domain", "ai.onnx.ml")),
        r"no version for the default domain",
    ),
    "float-size": (
        _mutated(single("LRN", X4, 13), _set_attribute("size", helper.make_attribute("size", 2.0))),
        r"node 'lrn_node' \(LRN@13\): attribute 'size' must be INT, not FLOAT",
    ),
    "attribute-twice": (
        _mutated(single("LRN", X4, 13, size=3), _set_attribute("size", helper.make_attribute("size", 5))),
        r"node 'lrn_node' \(LRN@13\): attribute 'size' is given twice",
    ),
    "missing-size": (
        single("LRN", X4, 13).SerializeToString(),
        r"node 'lrn_node' \(LRN@13\): attribute 'size' is required",
    ),
    "concat-without-axis": (single("Concat", X4, 11).SerializeToString(), r"attribute 'axis' is required from opset 4"),
    "bad-auto-pad": (
        single("Conv", X4, 13, ["w"], W, auto_pad="SAME").SerializeToString(),
        r"node 'conv_node' \(Conv@13\): auto_pad 'SAME' is none of",
    ),
    "negative-pads": (
        single("Conv", X4, 13, ["w"], W, pads=[1, -1, 0, 0]).SerializeToString(),
        r"pads must not be negative",
    ),
    "kernel-shape-mismatch": (
        single("Conv", X4, 13, ["w"], W, kernel_shape=[5, 5]).SerializeToString(),
        r"kernel_shape \[5, 5\] does not match the weight's shape \[6, 4, 3, 3\]",
    ),
    "conv-without-weight": (
        single("Conv", X4, 13).SerializeToString(),
        r"node 'conv_node' \(Conv@13\): needs 2 inputs",
    ),
    "two-minus-ones": (
        single("Reshape", X4, 13, ["s"], {"s": np.array([-1, -1], np.int64)}).SerializeToString(),
        r"target shape \[-1, -1\] has more than one -1",
    ),
    "bad-perm": (
        single("Transpose", X4, 13, perm=[0, 1, 1, 2]).SerializeToString(),
        r"perm \[0, 1, 1, 2\] is not a permutation",
    ),
    "external-data": (_mutated(CONV, _external), r"initializer 'w': tensor 'w' keeps its data in an external file"),
    "short-raw-data": (_mutated(CONV, _short_raw), r"tensor 'w' of shape \[6, 4, 3, 3\] needs 864 bytes, has 860"),
    "string-initializer": (_mutated(CONV, _string_initializer), r"tensor 'names' has element type STRING"),
    "cycle": (_mutated(RELU, _cycle), r"input '.' depends on the node's own output"),
    "output-defined-twice": (
        _mutated(RELU, lambda m: m.graph.node.append(helper.make_node("Relu", ["x"], ["y"], name="again"))),
        r"node 'again' \(Relu\): output 'y' is already defined",
    ),
    "output-not-computed": (
        _mutated(RELU, lambda m: setattr(m.graph.output[0], "name", "nowhere")),
        r"graph output 'nowhere' is not computed by any node",
    ),
    "name-not-utf8": (
        RELU.SerializeToString().replace(b"relu_node", b"relu\xff\xfeode"),
        r"not an ONNX model \(a name in node 0 b'relu\\xff\\xfeode' is not UTF-8 text\)",
    ),
    "node-without-op-type": (
        _mutated(RELU, lambda m: m.graph.node[0].ClearField("op_type")),
        r"node 'relu_node' has no op_type",
    ),
    "two-outputs-on-relu": (
        _mutated(RELU, lambda m: m.graph.node[0].output.append("extra")),
        r"node 'relu_node' \(Relu@13\): has 2 outputs, the op has one",
    ),
}


@pytest.mark.parametrize(("data", "message"), list(LOAD_ERRORS.values()), ids=list(LOAD_ERRORS))
def test_load_error_is_one_line_naming_the_file(data: bytes, message: str) -> None:
    with pytest.raises(ir.ModelLoadError) as refused:
        parse_model(data, "bad.onnx")
    text = str(refused.value)
    assert "\n" not in text and text.startswith("bad.onnx: ")
    assert re.search(message, text), text


def test_read_model_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ir.ModelLoadError, match=r"nope\.onnx: no such file$"):
        read_model(tmp_path / "nope.onnx")
    with pytest.raises(ir.ModelLoadError, match=r": cannot read the file \("):
        read_model(tmp_path)
    path = tmp_path / "half.onnx"
    path.write_bytes(light_path("zfnet512").read_bytes()[:3000])
    with pytest.raises(ir.ModelLoadError, match=rf"^{re.escape(str(path))}: not an ONNX model"):
        read_model(path)
    path.write_bytes(RELU.SerializeToString())
    assert read_model(path).origin == str(path)


def test_fuzzed_files_load_or_fail_cleanly() -> None:
    """Random bytes, truncations and byte flips of real files: a graph or a ModelLoadError."""
    rng = np.random.default_rng(14)
    originals = [
        light_path("squeezenet").read_bytes(),
        light_path("bvlc_alexnet").read_bytes(),
        CONV.SerializeToString(),
    ]
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(200):
        original = originals[case % len(originals)]
        if case < 40:
            data = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
        elif case < 100:
            data = original[: int(rng.integers(0, len(original)))]
        else:
            flipped = bytearray(original)
            for position in rng.integers(0, len(original), int(rng.integers(1, 4))):
                flipped[position] = int(rng.integers(0, 256))
            data = bytes(flipped)
        try:
            graph = parse_model(data, f"fuzz-{case}.onnx")
        except ir.ModelLoadError as refused:
            assert "\n" not in str(refused) and str(refused).startswith(f"fuzz-{case}.onnx: ")
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            assert all(
                isinstance(name, str) for node in graph.nodes for name in (node.name, *node.inputs, *node.outputs)
            )
    assert outcomes["refused"] >= 100 and outcomes["loaded"] >= 5, outcomes
