"""``lrnserve inspect`` / ``convert`` and the ONNX export behind ``convert``.

The reference for every exported file is onnxruntime, an implementation lrnserve did not
write, compared with lrnserve's own runtime (GraphNetwork) at batch 1 and 3; the pooling and
LRN cases are also checked against loops written here from Caffe's definitions
(../shared/model-formats.md, ../shared/lrn-semantics.md), which call no lrnserve code.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lrnserve.server.importers.describe import describe, report
from lrnserve.server.importers.export_onnx import ExportError, export
from lrnserve.server.models import ir
from lrnserve.server.models.runtime import GraphNetwork

CAFFE_MODELS = Path(__file__).resolve().parent / "data" / "caffe"
BVLC = [
    "bvlc_alexnet",
    "bvlc_reference_caffenet",
    "bvlc_googlenet",
    "bvlc_reference_rcnn_ilsvrc13",
    "cifar10_full",
]
TOLERANCE = 1e-4


# ---- references written from the definitions -----------------------------------------------


def pooled_size(extent: int, kernel: int, stride: int, begin: int, end: int, ceil: bool, clip: bool) -> int:
    span = extent + begin + end - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and clip and (out - 1) * stride >= extent + begin:  # Caffe: no window starts in the padding
        out -= 1
    return out


def reference_pool(
    x: np.ndarray,
    method: str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    ceil: bool,
    clip: bool,
    count_include_pad: bool,
) -> np.ndarray:
    """Caffe's pooling: MAX over the in-image part of the window; AVE sums the in-image values
    and divides by the window clipped to the padded extent (or by its in-image part)."""
    n, c, h, w = x.shape
    oh = pooled_size(h, kernel[0], stride[0], pads[0], pads[2], ceil, clip)
    ow = pooled_size(w, kernel[1], stride[1], pads[1], pads[3], ceil, clip)
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * stride[0] - pads[0], j * stride[1] - pads[1]
            h1, w1 = h0 + kernel[0], w0 + kernel[1]
            window = x[:, :, max(h0, 0) : min(h1, h), max(w0, 0) : min(w1, w)].astype(np.float64)
            if method == "max":
                y[:, :, i, j] = window.max(axis=(2, 3))
            else:
                if count_include_pad:
                    divisor = (min(h1, h + pads[2]) - h0) * (min(w1, w + pads[3]) - w0)
                else:
                    divisor = window.shape[2] * window.shape[3]
                y[:, :, i, j] = window.sum(axis=(2, 3)) / divisor
    return y


def reference_lrn(
    x: np.ndarray, size: int, alpha: float, beta: float, k: float, region: str, extra: str = "before"
) -> np.ndarray:
    """x / (k + alpha / n * sum of x^2 over the window)^beta, zeros outside; n^2 for WITHIN."""
    before = size // 2 if extra == "before" else (size - 1) // 2
    after = size - 1 - before
    square = x.astype(np.float64) ** 2
    _, c, h, w = x.shape
    if region == "across":
        padded = np.pad(square, ((0, 0), (before, after), (0, 0), (0, 0)))
        total = sum(padded[:, i : i + c] for i in range(size))
        return x / (k + alpha / size * total) ** beta
    padded = np.pad(square, ((0, 0), (0, 0), (before, after), (before, after)))
    total = sum(padded[:, :, i : i + h, j : j + w] for i in range(size) for j in range(size))
    return x / (k + alpha / size**2 * total) ** beta


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


# ---- helpers ----------------------------------------------------------------------------------


def chain(
    sample: Sequence[int],
    nodes: Sequence[tuple[ir.Op, Sequence[str]]],
    constants: dict[str, np.ndarray] | None = None,
    fmt: str = "caffe",
) -> ir.Graph:
    """Nodes n0, n1, ... writing v0, v1, ...; "x" is the input and "@" the previous value."""
    built, previous = [], "x"
    for index, (op, inputs) in enumerate(nodes):
        value = f"v{index}"
        built.append(
            ir.Node(f"n{index}", type(op).__name__, op, tuple(previous if i == "@" else i for i in inputs), (value,))
        )
        previous = value
    return ir.Graph(
        "hand", fmt, "hand-built", ir.Tensor("data", "x", (1, *sample)), ir.Tensor("out", previous), built,
        {name: np.asarray(a, dtype=np.float32) for name, a in (constants or {}).items()},
    )  # fmt: skip


def one(op: ir.Op, sample: Sequence[int], constants: dict[str, np.ndarray] | None = None) -> ir.Graph:
    return chain(sample, [(op, ["x", *(constants or {})])], constants)


def session(data: bytes) -> ort.InferenceSession:
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def compare(graph: ir.Graph, batches: Sequence[int] = (1, 3), opset: int = 13, scale: float = 1.0) -> list[np.ndarray]:
    """Export, then onnxruntime vs lrnserve at each batch; returns the inputs used."""
    network = GraphNetwork(graph).eval()
    runner = session(export(graph, network, opset))
    rng = np.random.default_rng(1)
    inputs = []
    for batch in batches:
        x = (rng.standard_normal((batch, *network.input_shape)) * scale).astype(np.float32)
        (got,) = runner.run([graph.output.name], {graph.input.name: x})
        with torch.inference_mode():
            expected = network(torch.from_numpy(x)).numpy()
        assert got.shape == expected.shape
        assert relative_error(got, expected) < TOLERANCE, (batch, relative_error(got, expected))
        inputs.append(x)
    return inputs


def onnx_ops(data: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_from_string(data).graph.node]


# ---- export: each path, hand-built ----------------------------------------------------------

POOLS = {
    # Caffe (pad > 0): ceil with the clip rule firing; 7 -> 4 not 5
    "max ceil clip": ir.Pool("max", (2, 2), (2, 2), (1, 1, 1, 1), ceil=True, clip_last_window=True),
    "avg ceil clip": ir.Pool("avg", (2, 2), (2, 2), (1, 1, 1, 1), ceil=True, count_include_pad=True),
    # the last window runs past the padded extent: divisor 2x3, not 3x3 (correction map)
    "avg divisor pad": ir.Pool("avg", (3, 3), (2, 2), (1, 1, 1, 1), ceil=True, count_include_pad=True),
    "avg divisor no pad": ir.Pool("avg", (3, 3), (2, 2), ceil=True, clip_last_window=False, count_include_pad=True),
    "avg in-image": ir.Pool("avg", (3, 3), (2, 2), (1, 1, 1, 1), ceil=True, count_include_pad=False),
    "avg asymmetric floor": ir.Pool("avg", (3, 3), (2, 2), (2, 0, 1, 2), count_include_pad=True),
    "max floor": ir.Pool("max", (3, 3), (3, 2), (0, 1, 0, 1)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pool_export_matches_onnxruntime_and_caffe_definition(name: str) -> None:
    op = POOLS[name]
    graph = one(op, (3, 7, 8))
    network = GraphNetwork(graph)
    assert network.value_shapes["v0"] == (
        1, 3, *(pooled_size(e, op.kernel[a], op.stride[a], op.pads[a], op.pads[a + 2], op.ceil, op.clip_last_window)
                for a, e in enumerate((7, 8))),
    )  # fmt: skip
    data = export(graph, network)
    assert "Pad" not in onnx_ops(data)  # explicit pool pads, floor mode
    assert all(a.name != "ceil_mode" or a.i == 0 for n in onnx.load_from_string(data).graph.node for a in n.attribute)
    for x in compare(graph):
        (got,) = session(data).run(["out"], {"data": x})
        expected = reference_pool(x, op.method, op.kernel, op.stride, op.pads, op.ceil, op.clip_last_window,
                                  op.count_include_pad)  # fmt: skip
        assert relative_error(got, expected) < 1e-5


def test_avg_divisor_correction_is_needed_and_applied() -> None:
    """Without the correction map onnxruntime would divide the last row by 9, not 6."""
    graph = one(POOLS["avg divisor pad"], (2, 8, 8))
    data = export(graph)
    assert onnx_ops(data) == ["AveragePool", "Mul"]
    model = onnx.load_from_string(data)
    (divisor,) = [t for t in model.graph.initializer if "divisor" in t.name]
    correction = onnx.numpy_helper.to_array(divisor)
    assert correction.shape == (1, 1, 5, 5)
    assert correction[0, 0, -1, -1] == pytest.approx(9 / 4) and correction[0, 0, 0, 0] == 1.0


def test_pool_whose_window_lies_in_the_padding_uses_explicit_pad() -> None:
    """ceil without the clip rule (Caffe, pad 0) can place a window past the image; onnxruntime
    rejects pads as large as the kernel, so the export pads explicitly."""
    graph = one(ir.Pool("avg", (1, 1), (2, 2), ceil=True, clip_last_window=False, count_include_pad=True), (2, 6, 6))
    assert GraphNetwork(graph).value_shapes["v0"] == (1, 2, 4, 4)
    assert "Pad" in onnx_ops(export(graph))
    compare(graph)


def test_global_pooling() -> None:
    compare(chain((4, 5, 6), [(ir.Pool("avg", global_pool=True), ["@"]), (ir.Pool("max", global_pool=True), ["x"])]))


LRNS = [
    ir.LRN(5, 1e-4, 0.75, 1.0),
    ir.LRN(3, 5e-5, 0.75, 1.0, "within"),  # cifar10_full's WITHIN_CHANNEL
    ir.LRN(5, 0.5, 0.75, 2.0, "within"),
    ir.LRN(4, 0.3, 0.6, 2.0, "across", "before"),
    ir.LRN(4, 0.3, 0.6, 2.0, "across", "after"),
    ir.LRN(2, 0.3, 0.6, 1.5, "within", "before"),
]


@pytest.mark.parametrize("op", LRNS, ids=lambda op: f"{op.region}-{op.size}-{op.extra_neighbour}")
def test_lrn_export_matches_onnxruntime_and_definition(op: ir.LRN) -> None:
    graph = one(op, (7, 6, 5))
    data = export(graph)
    assert ("LRN" in onnx_ops(data)) == (op.region == "across" and op.size % 2 == 1)
    for x in compare(graph, scale=3.0):
        (got,) = session(data).run(["out"], {"data": x})
        expected = reference_lrn(x, op.size, op.alpha, op.beta, op.k, op.region, op.extra_neighbour)
        assert relative_error(got, expected) < 1e-5


def test_scale_legacy_axis_with_constant_and_computed_operands() -> None:
    rng = np.random.default_rng(2)
    constants = {"gamma": rng.standard_normal(4), "beta": rng.standard_normal((4, 5)), "p": np.array([2.0])}
    compare(chain((4, 5, 6), [
        (ir.Binary("mul", legacy_axis=1), ["x", "gamma"]),  # Caffe Scale: [C] against [N, C, H, W]
        (ir.Binary("add", legacy_axis=1), ["@", "beta"]),  # Bias with num_axes 2
        (ir.Pool("avg", global_pool=True), ["@"]),
        (ir.Flatten(1), ["@"]),  # [N, C]
        (ir.Binary("mul", legacy_axis=0), ["v1", "@"]),  # computed [N, C] aligned at axis 0: Unsqueeze
        (ir.Binary("div", legacy_axis=3), ["@", "p"]),
    ], constants))  # fmt: skip


def test_eltwise_variants() -> None:
    compare(chain((3, 4, 4), [
        (ir.Activation("relu"), ["x"]),
        (ir.Variadic("sum", (0.5, -2.0)), ["x", "v0"]),  # Caffe Eltwise SUM coeff
        (ir.Variadic("prod"), ["x", "v0", "v1"]),
        (ir.Variadic("max"), ["v2", "v1"]),
        (ir.Variadic("sum", (3.0,)), ["@"]),
        (ir.Variadic("min"), ["@", "x"]),
    ]))  # fmt: skip


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_coerce_2d_and_per_axis(axis: int) -> None:
    graph = chain((3, 4, 5), [(ir.Softmax(axis, coerce_2d=True), ["x"]), (ir.Softmax(axis), ["@"])])
    compare(graph)


def test_inner_product_axes_and_transpose() -> None:
    rng = np.random.default_rng(3)
    constants = {
        "w1": rng.standard_normal((6, 60)), "b1": rng.standard_normal(6),
        "w2": rng.standard_normal((20, 7)),  # transposed: [in, out]
        "w3": rng.standard_normal((2, 6)), "b3": rng.standard_normal(2),
    }  # fmt: skip
    compare(chain((3, 4, 5), [
        (ir.InnerProduct(2, transpose=True), ["x", "w2"]),  # [N, 3, 7]: Reshape + MatMul
        (ir.InnerProduct(1), ["x", "w1", "b1"]),  # Flatten + Gemm
        (ir.InnerProduct(-1), ["@", "w3", "b3"]),
    ], constants))  # fmt: skip


def test_shape_ops_and_the_rest() -> None:
    rng = np.random.default_rng(4)
    constants = {
        "w": rng.standard_normal((8, 3, 3, 3)), "b": rng.standard_normal(8),
        "scale": rng.uniform(0.5, 2, 8), "shift": rng.standard_normal(8), "mean": rng.standard_normal(8),
        "var": rng.uniform(0.5, 2, 8), "g": rng.standard_normal((8 * 5 * 4, 6)), "m": rng.standard_normal((6, 5)),
        "c": rng.standard_normal(5),
    }  # fmt: skip
    compare(chain((3, 5, 4), [
        (ir.Conv(stride=(1, 1), pads=(1, 0, 1, 2), group=1), ["x", "w", "b"]),  # [N, 8, 5, 4]
        (ir.BatchNorm(1e-3), ["@", "scale", "shift", "mean", "var"]),
        (ir.Activation("relu", 0.1), ["@"]),
        (ir.Clip(-1.5, 2.0), ["@"]),
        (ir.Clip(None, 1.0), ["@"]),
        (ir.Activation("sigmoid"), ["v3"]),
        (ir.Activation("tanh"), ["v3"]),
        (ir.Concat(1), ["v5", "@", "v4"]),  # [N, 24, 5, 4]
        (ir.Flatten(1, 2), ["@"]),  # Caffe's range form: [N, 120, 4]
        (ir.Transpose((0, 2, 1)), ["@"]),  # [N, 4, 120]
        (ir.Unsqueeze((1,)), ["@"]),
        (ir.Squeeze((1,)), ["@"]),
        (ir.Reshape((1, -1, 160)), ["v8"]),  # the trial's batch 1 baked in: exported as 0
        (ir.Reshape((-1, 160)), ["@"]),
        (ir.Flatten(1), ["v3"]),
        (ir.Gemm(0.5, 1.0, trans_a=False), ["@", "g"]),
        (ir.MatMul(), ["@", "m"]),
        (ir.Binary("add"), ["@", "c"]),
        (ir.Activation("identity"), ["@"]),
    ], constants))  # fmt: skip


def test_conv_auto_pad_and_dilation_and_group() -> None:
    rng = np.random.default_rng(5)
    constants = {"w": rng.standard_normal((6, 2, 3, 3)), "w2": rng.standard_normal((6, 3, 2, 2))}
    compare(chain((4, 9, 8), [
        (ir.Conv(stride=(2, 2), group=2, auto_pad="SAME_UPPER"), ["x", "w"]),
        (ir.Conv(dilation=(2, 1), group=2, auto_pad="SAME_LOWER"), ["@", "w2"]),
    ], constants, fmt="onnx"))  # fmt: skip


def test_later_opset_and_model_fields() -> None:
    graph = chain((5, 6, 6), [(LRNS[1], ["x"]), (POOLS["avg divisor pad"], ["@"]), (ir.Softmax(1), ["@"])])
    compare(graph, opset=17)
    model = onnx.load_from_string(export(graph))
    assert model.ir_version == 7 and [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (graph_input,) = model.graph.input
    assert graph_input.name == "data"
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["N", 5, 6, 6]
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["N", 5, 4, 4]


def test_names_the_file_keeps_and_values_renamed_around_them() -> None:
    """A Caffe in-place last layer: the output's file name is also an earlier value's name."""
    graph = chain((3, 4, 4), [(ir.Activation("tanh"), ["x"]), (ir.Activation("relu"), ["@"])])
    graph.output = ir.Tensor("v0", "v1")
    graph.input = ir.Tensor("v1", "x", (1, 3, 4, 4))
    compare(graph)
    model = onnx.load_from_string(export(graph))
    assert [model.graph.input[0].name, model.graph.output[0].name] == ["v1", "v0"]


def test_what_onnx_cannot_express_is_one_line_naming_the_node() -> None:
    graph = chain((3, 4, 4), [(ir.Activation("relu"), ["x"]), (ir.Unsupported("Pooling with pool: STOCHASTIC"), ["@"])])
    with pytest.raises(ExportError, match=r"layer 'n1' \(Unsupported\).*STOCHASTIC") as raised:
        export(graph)
    assert "\n" not in str(raised.value)
    with pytest.raises(ExportError, match="opset 12"):
        export(one(ir.Activation("relu"), (3, 4, 4)), opset=12)


# ---- describe --------------------------------------------------------------------------------


def test_describe_lists_parameters_and_what_cannot_run() -> None:
    graph = chain((3, 7, 8), [
        (LRNS[1], ["x"]),
        (POOLS["avg divisor pad"], ["@"]),
        (ir.Unsupported("Pooling with pool: STOCHASTIC is not supported"), ["@"]),
    ])  # fmt: skip
    graph.nodes[0] = ir.Node("norm1", "LRN", LRNS[1], ("x",), ("v0",), (("k", "2 in the file, ignored by Caffe"),))
    result = report(graph)
    assert not result.runnable and result.network is None
    text = result.text
    assert "within channel, size 3, alpha 5e-05, beta 0.75, k 1, k: 2 in the file, ignored by Caffe" in text
    assert (
        "avg, kernel 3x3, stride 2x2, pad 1x1, rounding ceil (a last window that would start in the end padding" in text
    )
    assert "lrnserve cannot run 1 layer(s)" in text and "n2 (Unsupported): Pooling with pool: STOCHASTIC" in text
    assert describe(chain((3, 4, 4), [(ir.Activation("relu"), ["x"])])).endswith("lrnserve can run this model")


def test_describe_reports_a_load_error_and_per_sample_batching() -> None:
    broken = chain((3, 4, 4), [(ir.Reshape((5, -1)), ["x"])])
    result = report(broken)
    assert not result.runnable
    assert result.text.splitlines()[-1].startswith("lrnserve cannot load this model: hand-built: layer 'n0' (Reshape)")
    per_sample = chain((3, 4, 4), [(ir.Softmax(0), ["x"])], fmt="onnx")
    assert "batching: one sample at a time, because node 'n0'" in describe(per_sample)


# ---- real Caffe nets, through the Caffe importer ------------------------------------------


def logits(graph: ir.Graph) -> ir.Graph:
    """The graph without its final Softmax: random weights give near-uniform probabilities,
    which would hide errors that the logits show."""
    last = graph.nodes[-1]
    if not isinstance(last.op, ir.Softmax):
        return graph
    return ir.Graph(graph.name, graph.format, graph.origin, graph.input, ir.Tensor(graph.output.name, last.inputs[0]),
                    graph.nodes[:-1], graph.constants)  # fmt: skip


@pytest.mark.parametrize("name", BVLC)
def test_bvlc_deploy_nets_convert_faithfully(name: str, tmp_path: Path) -> None:
    from lrnserve.server.importers import read_caffe, read_onnx

    prototxt = CAFFE_MODELS / f"{name}.deploy.prototxt"
    graph = read_caffe(prototxt, seed=7)
    if name == "bvlc_alexnet":
        assert graph.parameter_count() == 60_965_224  # BVLC AlexNet's published count
    compare(logits(graph), scale=50.0)  # about the range of mean-subtracted pixels
    if name == "cifar10_full":  # the ONNX importer reads the file back as the same model
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(export(graph))
        x = torch.from_numpy(np.random.default_rng(8).standard_normal((2, *graph.input.shape[1:])) * 50).float()
        with torch.inference_mode():
            assert relative_error(GraphNetwork(read_onnx(path))(x).numpy(), GraphNetwork(graph)(x).numpy()) < 1e-6


MINI_NET = """
name: "mini"
input: "data"
input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" eltwise_param { coeff: 1 coeff: -0.5 } }
layer { name: "pool1" type: "Pooling" bottom: "sum" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL k: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "norm1" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_caffe_layers_convert_faithfully(tmp_path: Path) -> None:
    """BatchNorm + Scale (legacy axis), in-place layers, Eltwise coefficients, AVE pooling with
    Caffe's clip rule and divisor, WITHIN_CHANNEL LRN whose k Caffe ignores."""
    from lrnserve.server.importers import read_caffe

    (tmp_path / "mini.prototxt").write_text(MINI_NET)
    graph = read_caffe(tmp_path / "mini.prototxt", seed=3)
    compare(logits(graph), scale=3.0)
    compare(graph)
    text = describe(graph)
    assert "within channel, size 3, alpha 0.5, beta 0.75, k 1, k: 2 in the file, ignored" in text
    assert "-> [1, 4, 5, 5]" in text.split("pool1")[1].splitlines()[0]  # 9 -> 5, not 6: Caffe's clip rule fired


# ---- the commands ------------------------------------------------------------------------------

CIFAR_BLOBS = {
    "conv1": [(32, 3, 5, 5), (32,)],
    "conv2": [(32, 32, 5, 5), (32,)],
    "conv3": [(64, 32, 5, 5), (64,)],
    "ip1": [(10, 1024), (10,)],
}


def write_caffemodel(path: Path, blobs: dict[str, list[tuple[int, ...]]], v1: bool = False, seed: int = 0) -> dict:
    """Trained-looking weights for a net, written with the project's Caffe protobuf subset: the
    current ``layer`` format, or V1 ``layers`` with 4-D num/channels/height/width blobs."""
    from lrnserve.server.importers.pb import caffe_pb2

    rng = np.random.default_rng(seed)
    net = caffe_pb2.NetParameter(name="weights")
    arrays = {}
    for name, shapes in blobs.items():
        layer = net.layers.add(name=name) if v1 else net.layer.add(name=name, type="Convolution")
        for shape in shapes:
            array = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 10)).astype(
                np.float32
            )
            arrays[(name, len(layer.blobs))] = array
            blob = layer.blobs.add()
            if v1:
                legacy = (1,) * (4 - len(shape)) + shape
                blob.num, blob.channels, blob.height, blob.width = legacy
            else:
                blob.shape.dim.extend(shape)
            blob.data.extend(array.reshape(-1).tolist())
    path.write_bytes(net.SerializeToString())
    return arrays


def lrnserve(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lrnserve.client.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lrnserve {command}: "), result.stderr
    return lines[0]


def test_inspect_shows_lrn_parameters_and_rounding() -> None:
    result = lrnserve("inspect", CAFFE_MODELS / "cifar10_full.deploy.prototxt")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "input  data [N, 3, 32, 32]" in out and "output prob [N, 10]" in out
    assert "norm1  LRN" in out and "within channel, size 3, alpha 5e-05, beta 0.75, k 1" in out
    assert "ignored: Caffe's WITHIN_CHANNEL" in out
    assert "avg, kernel 3x3, stride 2x2, pad 0x0, rounding ceil" in out
    assert "parameters: 89,578" in out and out.rstrip().endswith("lrnserve can run this model")


def test_inspect_lists_what_lrnserve_cannot_run(tmp_path: Path) -> None:
    prototxt = tmp_path / "odd.prototxt"
    prototxt.write_text(MINI_NET.replace('type: "ReLU"', 'type: "PReLU"').replace("pool: MAX", "pool: STOCHASTIC"))
    result = lrnserve("inspect", prototxt)
    assert result.returncode == 1 and not result.stderr, result.stderr
    assert "lrnserve cannot run 2 layer(s) of this model:" in result.stdout
    assert "relu1 (PReLU): layer type 'PReLU' is not supported" in result.stdout
    assert "pool2 (Pooling): Pooling with pool: STOCHASTIC" in result.stdout
    with pytest.raises(ExportError, match="layer 'relu1' \\(PReLU\\)"):
        from lrnserve.server.importers import read_caffe

        export(read_caffe(prototxt))


def test_convert_writes_a_checked_onnx_file(tmp_path: Path) -> None:
    weights = tmp_path / "cifar10_full.caffemodel"
    arrays = write_caffemodel(weights, CIFAR_BLOBS, seed=5)
    out = tmp_path / "cifar10.onnx"
    result = lrnserve("convert", CAFFE_MODELS / "cifar10_full.deploy.prototxt", "--weights", weights, "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "checked in onnxruntime" in result.stdout and "(ok)" in result.stdout
    model = onnx.load(out)
    written = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    assert any(w.shape == arrays[("conv1", 0)].shape and np.array_equal(w, arrays[("conv1", 0)]) for w in written)
    inspected = lrnserve("inspect", out)  # the ONNX importer reads what convert wrote
    assert inspected.returncode == 0, inspected.stderr
    assert "model" in inspected.stdout and inspected.stdout.rstrip().endswith("lrnserve can run this model")


def test_legacy_v1_caffemodel_converts(tmp_path: Path) -> None:
    from lrnserve.server.importers import read_caffe

    weights = tmp_path / "v1.caffemodel"
    arrays = write_caffemodel(weights, CIFAR_BLOBS, v1=True, seed=6)
    graph = read_caffe(CAFFE_MODELS / "cifar10_full.deploy.prototxt", weights)
    model = onnx.load_from_string(export(graph))
    written = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    assert any(w.shape == (10, 1024) and np.array_equal(w, arrays[("ip1", 0)]) for w in written)
    compare(logits(graph), scale=50.0)


def test_command_errors_are_one_line(tmp_path: Path) -> None:
    missing = one_line_error(lrnserve("inspect", tmp_path / "absent.prototxt"), "inspect")
    assert "absent.prototxt" in missing
    prototxt = CAFFE_MODELS / "cifar10_full.deploy.prototxt"
    truncated = tmp_path / "truncated.caffemodel"
    write_caffemodel(truncated, CIFAR_BLOBS)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    line = one_line_error(lrnserve("convert", prototxt, "--weights", truncated, "-o", tmp_path / "x.onnx"), "convert")
    assert "truncated.caffemodel" in line
    assert not (tmp_path / "x.onnx").exists()


def test_convert_without_onnxruntime_says_it_did_not_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lrnserve.server import modeltools

    real = importlib.import_module

    def no_onnxruntime(name: str, package: str | None = None) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name=name)
        return real(name, package)

    monkeypatch.setattr(modeltools.importlib, "import_module", no_onnxruntime)
    prototxt, out = CAFFE_MODELS / "cifar10_full.deploy.prototxt", tmp_path / "m.onnx"
    assert modeltools.main(["convert", str(prototxt), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seeded random weights" in printed and "not verified: onnxruntime is not installed" in printed
    assert out.stat().st_size > 0


def test_convert_fails_when_the_check_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lrnserve.server import modeltools

    monkeypatch.setattr(modeltools, "TOLERANCE", -1.0)
    prototxt, out = CAFFE_MODELS / "cifar10_full.deploy.prototxt", tmp_path / "m.onnx"
    assert modeltools.main(["convert", str(prototxt), "-o", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "max relative error" in printed and "(FAILED, above -1)" in printed


def test_argument_and_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lrnserve.client import cli

    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"")
    assert cli.main(["inspect", str(weights)]) == 1
    assert capsys.readouterr().err.strip() == f"lrnserve inspect: {weights}: a caffemodel holds weights only; " \
        "give its net's prototxt too"  # fmt: skip
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\xff\xff garbage")
    assert cli.main(["inspect", str(corrupt)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lrnserve inspect: ") and "corrupt.onnx" in err
    assert cli.main(["inspect", str(corrupt), "--prototxt", str(corrupt)]) == 1
    assert "--prototxt goes with a .caffemodel" in capsys.readouterr().err
    assert cli.main(["convert", str(weights), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "give the net's prototxt first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli.main(["convert", "net.prototxt"])  # no -o
    assert usage.value.code == 2 and "-o/--output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert "inspect" in listed and "convert" in listed


def test_missing_server_extra_is_a_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lrnserve.client import cli

    monkeypatch.setitem(sys.modules, "lrnserve.server.modeltools", None)  # import fails as without torch
    assert cli.main(["inspect", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lrnserve[server]'" in err


def test_onnx_zoo_graph_re_exports_faithfully(tmp_path: Path) -> None:
    """An ONNX-origin graph (inception_v1 from the onnx package, seeded weights): ONNX's own
    ceil pooling, LRN, Concat and the batch-1 Reshape target, at batch 1 and 3."""
    import onnx_files

    from lrnserve.server.importers import read_onnx

    path = tmp_path / "inception_v1.onnx"
    made = onnx_files.light_with_weights("inception_v1")  # the ONNX importer's tests' helper
    path.write_bytes(made[0])
    graph = read_onnx(path)
    inputs = compare(graph)
    # ...and lrnserve's run of the imported file is onnxruntime's run of the original file.
    network = GraphNetwork(graph).eval()
    with torch.inference_mode():
        got = network(torch.from_numpy(inputs[0])).numpy()
    assert relative_error(got, onnx_files.ort_run(made[1], inputs[0])) < TOLERANCE
