"""The Caffe importer, checked against Caffe's own definitions.

References the project did not write: ``caffe_files.caffe_forward`` (Caffe's layer code, written
out in the test: pooling's output size and AVE divisor, both LRN regions), and the built-in
networks loading the same caffemodel. Caffemodels are written here with random weights, in the
current and the legacy V1 format (legacy 4-D blob shapes); the real BVLC deploy prototxts are
used as they are. Relative error < 1e-4 in float32 against the float64 reference.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from caffe_files import (
    blob_proto,
    caffe_forward,
    caffemodel_bytes,
    layer_types,
    length_delimited,
    parse_net,
    write_caffemodel,
    write_mean,
)

from lrnserve.server.importers import built_in_network, caffe, load_caffemodel
from lrnserve.server.importers.pb import caffe_pb2
from lrnserve.server.models import NETWORKS, create_network, ir
from lrnserve.server.models.runtime import GraphNetwork

SHARED = Path(__file__).resolve().parent / "data" / "caffe"
TOLERANCE = 1e-4


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def run(graph: ir.Graph, x: np.ndarray) -> np.ndarray:
    net = GraphNetwork(graph).eval()
    with torch.inference_mode():
        out: np.ndarray = net(torch.from_numpy(x)).numpy()
    return out


def upto(graph: ir.Graph, layer: str) -> ir.Graph:
    """The graph cut after the node of ``layer`` (e.g. the logits before a Softmax)."""
    index = next(i for i, node in enumerate(graph.nodes) if node.name == layer)
    value = graph.nodes[index].outputs[0]
    return dataclasses.replace(graph, nodes=graph.nodes[: index + 1], output=ir.Tensor(layer, value))


def lay(name: str, kind: str, bottom: str = "", top: str = "", params: str = "") -> str:
    bottoms = " ".join(f'bottom: "{b}"' for b in bottom.split())
    tops = " ".join(f'top: "{t}"' for t in (top or name).split())
    return f'layer {{ name: "{name}" type: "{kind}" {bottoms} {tops} {params} }}\n'


def deploy(layers: str, shape: tuple[int, ...] = (2, 4, 9, 9)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'name: "t"\ninput: "data"\ninput_shape {{ {dims} }}\n{layers}'


def conv(name: str, bottom: str = "data", out: int = 4, extra: str = "kernel_size: 3 pad: 1", top: str = "") -> str:
    return lay(name, "Convolution", bottom, top, f"convolution_param {{ num_output: {out} {extra} }}")


def check(tmp_path: Path, text: str, *, v1_model: bool = False, seed: int = 0) -> ir.Graph:
    """Import ``text`` with a caffemodel of the reference's random weights; compare outputs."""
    net = parse_net(text)
    inputs = [lay.input_param.shape[0].dim for lay in net.layer if lay.type == "Input"]
    shape = tuple(net.input_shape[0].dim) if net.input_shape else tuple(net.input_dim) or tuple(inputs[-1])
    x = (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)
    want, weights = caffe_forward(net, x, seed=seed)
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(text)
    model = None
    if weights:
        model = write_caffemodel(tmp_path / "net.caffemodel", weights, types=layer_types(net), v1=v1_model)
    graph = caffe.read_net(prototxt, model)
    assert rel_error(run(graph, x), want[graph.output.name]) < TOLERANCE
    return graph


POOL = "pooling_param { pool: %s %s }"
CASES = {
    "conv group pad stride": conv("c", out=6, extra="group: 2 pad: 1 kernel_size: 3 stride: 2"),
    "conv _h/_w, no bias": conv(
        "c", out=3, extra="kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 bias_term: false"
    ),
    "conv per-axis values, dilation": conv("c", out=5, extra="kernel_size: 3 kernel_size: 1 pad: 2 pad: 0")
    + conv("d", "c", out=2, extra="kernel_size: 3 dilation: 2 pad: 1"),
    # 9x9, kernel 2, stride 2, pad 1: ceil gives 6 windows, the 6th starts in the padding: 5.
    "max pool ceil, clip rule": lay("p", "Pooling", "data", "", POOL % ("MAX", "kernel_size: 2 stride: 2 pad: 1")),
    # 10x10, kernel 3, stride 2, pad 1: the last window [9, 12) divides by 2 (clipped to [-1, 11)).
    "ave pool divisor at the padded edge": lay(
        "p", "Pooling", "data", "", POOL % ("AVE", "kernel_size: 3 stride: 2 pad: 1")
    ),
    "ave pool ceil without pad": lay("p", "Pooling", "data", "", POOL % ("AVE", "kernel_size: 3 stride: 2")),
    "pool round_mode FLOOR": lay(
        "p", "Pooling", "data", "", POOL % ("MAX", "kernel_size: 3 stride: 2 round_mode: FLOOR")
    )
    + lay("q", "Pooling", "p", "", POOL % ("AVE", "kernel_size: 2 stride: 2 pad: 1 round_mode: FLOOR")),
    "pool _h/_w": lay(
        "p", "Pooling", "data", "", POOL % ("MAX", "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0")
    ),
    "global pooling": lay("p", "Pooling", "data", "", POOL % ("AVE", "global_pooling: true"))
    + lay("q", "Pooling", "data", "", POOL % ("MAX", "global_pooling: true"))
    + lay("s", "Eltwise", "p q"),
    "LRN across channels": lay("n", "LRN", "data", "", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }"),
    "LRN within channel ignores k": lay(
        "n", "LRN", "data", "", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 norm_region: WITHIN_CHANNEL }"
    ),
    "in-place ReLU, Dropout; Sigmoid, TanH": conv("c")
    + lay("r", "ReLU", "c", "c", "relu_param { negative_slope: 0.1 }")
    + lay("d", "Dropout", "c", "c", "dropout_param { dropout_ratio: 0.3 }")
    + lay("s", "Sigmoid", "c", "s")
    + lay("t", "TanH", "data", "t")
    + lay("sum", "Eltwise", "s t c"),
    "Softmax axis": lay("s", "Softmax", "data", "", "softmax_param { axis: -1 }")
    + lay("s2", "Softmax", "s", "", "")
    + lay("s3", "Softmax", "s2", "", "softmax_param { axis: 2 }"),
    "Concat axis, concat_dim": conv("a")
    + conv("b", out=2)
    + lay("cat", "Concat", "a b data", "", "concat_param { concat_dim: 1 }")
    + lay("cat2", "Concat", "cat cat", "", "concat_param { axis: 2 }"),
    "Flatten, InnerProduct axis/transpose": lay("f", "Flatten", "data", "", "flatten_param { axis: 2 }")
    + lay("ip", "InnerProduct", "f", "", "inner_product_param { num_output: 5 axis: 2 }")
    + lay("ip2", "InnerProduct", "ip", "", "inner_product_param { num_output: 3 transpose: true bias_term: false }"),
    "Split fan-out, Eltwise forms": lay("split", "Split", "data", "x1 x2")
    + conv("a", "x1")
    + conv("b", "x2")
    + lay("sum", "Eltwise", "a b", "", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }")
    + lay("prod", "Eltwise", "a b sum", "", "eltwise_param { operation: PROD }")
    + lay("max", "Eltwise", "prod a", "", "eltwise_param { operation: MAX }")
    + lay("out", "Eltwise", "max data"),  # data read a second time: implicit fan-out
    "BatchNorm + Scale": conv("c")
    + lay("bn", "BatchNorm", "c", "c", "batch_norm_param { eps: 0.001 }")
    + lay("sc", "Scale", "c", "c", "scale_param { bias_term: true }")
    + lay("sc2", "Scale", "c data", "", "scale_param { axis: 0 }")
    + lay("sc3", "Scale", "sc2", "", "scale_param { axis: 2 num_axes: -1 }"),
}


EVEN_INPUT = {"ave pool divisor at the padded edge", "ave pool ceil without pad", "pool round_mode FLOOR"}  # 10x10


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_caffe(tmp_path: Path, case: str) -> None:
    check(tmp_path, deploy(CASES[case], (2, 4, 10, 10) if case in EVEN_INPUT else (2, 4, 9, 9)))


def test_pooling_shapes_follow_caffe(tmp_path: Path) -> None:
    graph = check(tmp_path, deploy(CASES["max pool ceil, clip rule"]))
    assert graph.output.shape == (2, 4, 5, 5)  # ceil alone gives 6; the padded-last-window rule drops one
    (node,) = graph.nodes
    assert node.op == ir.Pool("max", (2, 2), (2, 2), (1, 1, 1, 1), ceil=True, clip_last_window=True)
    floor = check(tmp_path, deploy(CASES["pool round_mode FLOOR"], (2, 4, 10, 10)))
    assert [n.op.ceil for n in floor.nodes] == [False, False]
    assert floor.output.shape == (2, 4, 3, 3)  # 10 -> floor(7/2)+1 = 4 -> floor(4/2)+1 = 3


def test_within_channel_lrn_keeps_the_files_k_as_a_detail(tmp_path: Path) -> None:
    graph = check(tmp_path, deploy(CASES["LRN within channel ignores k"]))
    (node,) = graph.nodes
    assert node.op == ir.LRN(3, 0.5, 0.75, 1.0, "within")
    assert "2 in the file" in dict(node.details)["k"]


def test_values_are_assigned_once(tmp_path: Path) -> None:
    graph = check(tmp_path, deploy(CASES["in-place ReLU, Dropout; Sigmoid, TanH"]))
    outputs = [value for node in graph.nodes for value in node.outputs]
    assert len(outputs) == len(set(outputs)) and "data" not in outputs
    relu, drop = graph.nodes[1], graph.nodes[2]
    assert relu.inputs == ("c",) and drop.inputs == relu.outputs and graph.nodes[3].inputs == drop.outputs
    split = check(tmp_path, deploy(CASES["Split fan-out, Eltwise forms"]))
    assert split.nodes[0].inputs[0] == split.nodes[1].inputs[0] == "data"  # Split tops alias their bottom
    assert "split" not in [node.name for node in split.nodes]


def test_batch_norm_factor_zero_means_zero(tmp_path: Path) -> None:
    text = deploy(lay("bn", "BatchNorm", "data"))
    stats = [np.full(4, 3.0, np.float32), np.full(4, 5.0, np.float32), np.zeros(1, np.float32)]
    (tmp_path / "n.prototxt").write_text(text)
    model = write_caffemodel(tmp_path / "n.caffemodel", {"bn": stats}, types={"bn": "BatchNorm"})
    graph = caffe.read_net(tmp_path / "n.prototxt", model)
    x = np.ones((2, 4, 9, 9), np.float32)
    assert np.allclose(run(graph, x), 1 / np.sqrt(1e-5), rtol=1e-5)


V1_NET = """name: "v1"
input: "data"
input_dim: 2 input_dim: 4 input_dim: 9 input_dim: 9
layers { name: "split" type: SPLIT bottom: "data" top: "a" top: "b" }
layers { name: "conv" type: CONVOLUTION bottom: "a" top: "conv" blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "norm" type: LRN bottom: "conv" top: "norm" lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 } }
layers { name: "cat" type: CONCAT bottom: "norm" bottom: "b" top: "cat" }
layers { name: "pool" type: POOLING bottom: "cat" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layers { name: "flat" type: FLATTEN bottom: "pool" top: "flat" }
layers { name: "fc" type: INNER_PRODUCT bottom: "flat" top: "fc" inner_product_param { num_output: 7 } }
layers { name: "drop" type: DROPOUT bottom: "fc" top: "fc" }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
"""


def test_v1_prototxt_and_v1_caffemodel(tmp_path: Path) -> None:
    graph = check(tmp_path, V1_NET, v1_model=True)
    assert [n.source for n in graph.nodes][:2] == ["Convolution (V1)", "ReLU (V1)"]
    assert graph.output == ir.Tensor("prob", "prob", (2, 7))
    v2 = check(tmp_path, V1_NET, v1_model=False)  # a V1 prototxt with a current-format caffemodel
    assert len(v2.nodes) == len(graph.nodes)


INPUT_FORMS = {
    "input_dim": 'input: "data" input_dim: 2 input_dim: 4 input_dim: 9 input_dim: 9\n',
    "input_shape": 'input: "data" input_shape { dim: 2 dim: 4 dim: 9 dim: 9 }\n',
    "Input layer": lay("in", "Input", "", "data", "input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } }"),
}


def test_input_forms_are_the_same_net(tmp_path: Path) -> None:
    body = conv("c") + lay("r", "ReLU", "c", "c")
    weights = {"c": [np.ones((4, 4, 3, 3), np.float32), np.arange(4, dtype=np.float32)]}
    model = write_caffemodel(tmp_path / "m.caffemodel", weights)
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 9)).astype(np.float32)
    outputs = []
    for form, declaration in INPUT_FORMS.items():
        (tmp_path / f"{form}.prototxt").write_text(f'name: "n"\n{declaration}{body}')
        graph = caffe.read_net(tmp_path / f"{form}.prototxt", model)
        assert graph.input == ir.Tensor("data", "data", (2, 4, 9, 9)), form
        outputs.append(run(graph, x))
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


TRAIN_VAL = f"""name: "tv"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
        data_param {{ batch_size: 64 }} }}
layer {{ name: "in" type: "Input" top: "data" include {{ phase: TEST }}
        input_param {{ shape {{ dim: 2 dim: 4 dim: 9 dim: 9 }} }} }}
{conv("c")}
layer {{ name: "noise" type: "Dropout" bottom: "c" top: "c" exclude {{ phase: TEST }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "c" top: "fc" param {{ lr_mult: 1 }}
        inner_product_param {{ num_output: 3 }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" }}
"""


def test_train_val_runs_its_test_phase(tmp_path: Path) -> None:
    graph = check(tmp_path, TRAIN_VAL)
    assert [n.name for n in graph.nodes] == ["c", "fc"]
    assert graph.output.name == "fc"


def test_mean_file(tmp_path: Path) -> None:
    mean = np.random.default_rng(2).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(caffe.read_blob(write_mean(tmp_path / "legacy.binaryproto", mean)), mean)
    got = caffe.read_blob(write_mean(tmp_path / "shaped.binaryproto", mean[0], legacy=False, double=True))
    assert got.dtype == np.float32 and got.shape == (3, 8, 8) and np.array_equal(got, mean[0])


# Load errors: one line each, naming the file, the layer, the blob and the shapes ------------


def load_error(call: object, *args: object) -> str:
    with pytest.raises(ir.ModelLoadError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


SMALL = deploy(
    conv("c", out=6, extra="kernel_size: 3")
    + lay("fc", "InnerProduct", "c", "", "inner_product_param { num_output: 3 }")
)
SMALL_WEIGHTS = {
    "c": [np.zeros((6, 4, 3, 3), np.float32), np.zeros(6, np.float32)],
    "fc": [np.zeros((3, 294), np.float32), np.zeros(3, np.float32)],
}
SMALL_TYPES = {"c": "Convolution", "fc": "InnerProduct"}


def small(tmp_path: Path, weights: dict[str, list[np.ndarray]] | None = None, **options: object) -> tuple[Path, Path]:
    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(SMALL)
    model = write_caffemodel(tmp_path / "small.caffemodel", weights or SMALL_WEIGHTS, types=SMALL_TYPES, **options)
    return prototxt, model


def test_the_fast_writer_writes_what_protobuf_writes() -> None:
    slow = caffe_pb2.NetParameter(name="written by the tests")
    for v1 in (False, True):
        for name, arrays in SMALL_WEIGHTS.items():
            if v1:
                layer = slow.layers.add(name=name, type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
            else:
                layer = slow.layer.add(name=name, type="InnerProduct")
            for array in arrays:
                blob = layer.blobs.add()
                blob.data.extend(array.ravel().tolist())
                if v1:
                    blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
                else:
                    blob.shape.dim.extend(array.shape)
        fast = caffemodel_bytes(SMALL_WEIGHTS, dict.fromkeys(SMALL_WEIGHTS, "InnerProduct"), v1=v1)
        assert caffe_pb2.NetParameter.FromString(fast) == slow
        slow.ClearField("layer")


def test_small_net_loads_in_both_formats(tmp_path: Path) -> None:
    for v1 in (False, True):
        graph = caffe.read_net(*small(tmp_path, v1=v1))
        assert graph.origin.endswith("small.caffemodel") and graph.parameter_count() == 6 * 36 + 6 + 3 * 294 + 3
    extra = {**SMALL_WEIGHTS, "loss1/classifier": [np.zeros(3, np.float32)]}  # other layers are ignored
    assert caffe.read_net(*small(tmp_path, extra)).output.name == "fc"


def test_missing_layer_names_its_blobs(tmp_path: Path) -> None:
    message = load_error(caffe.read_net, *small(tmp_path, {"c": SMALL_WEIGHTS["c"]}))
    assert "small.caffemodel: layer 'fc' (InnerProduct): not in the caffemodel" in message
    assert "blob 0 (weight) (3, 294), blob 1 (bias) (3)" in message


def test_missing_blob(tmp_path: Path) -> None:
    message = load_error(caffe.read_net, *small(tmp_path, {**SMALL_WEIGHTS, "fc": SMALL_WEIGHTS["fc"][:1]}))
    assert "layer 'fc' (InnerProduct): blob 1 (bias, shape (3)) is missing" in message


def test_extra_blob(tmp_path: Path) -> None:
    weights = {**SMALL_WEIGHTS, "c": [*SMALL_WEIGHTS["c"], np.zeros(1, np.float32)]}
    message = load_error(caffe.read_net, *small(tmp_path, weights))
    assert "layer 'c' (Convolution): the caffemodel has 3 blobs for this layer; it takes weight, bias" in message


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    weights = {**SMALL_WEIGHTS, "c": [np.zeros((6, 4, 3, 2), np.float32), SMALL_WEIGHTS["c"][1]]}
    message = load_error(caffe.read_net, *small(tmp_path, weights))
    assert (
        "layer 'c' (Convolution): blob 0 (weight) has shape (6, 4, 3, 2) in the caffemodel, "
        "the layer expects (6, 4, 3, 3)" in message
    )
    legacy = {**SMALL_WEIGHTS, "fc": [np.zeros((3, 295), np.float32), SMALL_WEIGHTS["fc"][1]]}
    message = load_error(caffe.read_net, *small(tmp_path, legacy, v1=True))
    assert (
        "layer 'fc' (InnerProduct): blob 0 (weight) has shape (1, 1, 3, 295) in the caffemodel, "
        "the layer expects (3, 294)" in message
    )


def test_blob_values_must_fill_its_shape(tmp_path: Path) -> None:
    blob = blob_proto(np.zeros(5, np.float32))
    blob.shape.dim[:] = [2, 3]
    net = caffe_pb2.NetParameter()
    net.layer.add(name="c", type="Convolution").blobs.append(blob)
    (tmp_path / "bad.caffemodel").write_bytes(net.SerializeToString())
    message = load_error(caffe.read_caffemodel, tmp_path / "bad.caffemodel")
    assert "layer 'c': blob 0: holds 5 values, but its shape (2, 3) needs 6" in message


def test_corrupt_truncated_and_missing_files(tmp_path: Path) -> None:
    prototxt, model = small(tmp_path)
    data = model.read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 2])
    message = load_error(caffe.read_net, prototxt, tmp_path / "cut.caffemodel")
    assert "cut.caffemodel: not a readable caffemodel: corrupt, truncated or another format" in message
    (tmp_path / "noise.caffemodel").write_bytes(np.random.default_rng(3).bytes(4096))
    assert "noise.caffemodel: not a readable caffemodel" in load_error(
        caffe.read_net, prototxt, tmp_path / "noise.caffemodel"
    )
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    assert "empty.caffemodel: holds no layers" in load_error(caffe.read_net, prototxt, tmp_path / "empty.caffemodel")
    assert "absent.caffemodel: no such file" in load_error(caffe.read_net, prototxt, tmp_path / "absent.caffemodel")
    assert "absent.prototxt: no such file" in load_error(caffe.read_net, tmp_path / "absent.prototxt")
    assert "not a text prototxt" in load_error(caffe.read_net, model)
    assert "absent.binaryproto: no such file" in load_error(caffe.read_blob, tmp_path / "absent.binaryproto")
    assert "not a readable BlobProto" in load_error(caffe.read_blob, tmp_path / "noise.caffemodel")


def test_bad_prototxt_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "bad.prototxt").write_text(
        'name: "x"\ninput: "data"\nlayer {\n  name: "r" type: "ReLU" bottom: "data" {\n}\n'
    )
    message = load_error(caffe.read_net, tmp_path / "bad.prototxt")
    assert message.startswith(f"{tmp_path / 'bad.prototxt'}:4:") and "cannot parse the prototxt" in message


NET_ERRORS = {
    "unknown bottom": (
        deploy(lay("r", "ReLU", "nope")),
        "layer 'r' (ReLU): bottom 'nope' is not produced by any layer before it",
    ),
    "two outputs": (
        deploy(lay("a", "ReLU", "data") + lay("b", "TanH", "data")),
        "has 2 outputs (blobs no layer reads: 'a', 'b')",
    ),
    "even LRN": (
        deploy(lay("n", "LRN", "data", "", "lrn_param { local_size: 4 }")),
        "layer 'n' (LRN): local_size 4 is even",
    ),
    "batch statistics": (
        deploy(lay("bn", "BatchNorm", "data", "", "batch_norm_param { use_global_stats: false }")),
        "layer 'bn' (BatchNorm): use_global_stats: false normalizes with each batch's statistics",
    ),
    "a Data layer": (
        'name: "tv"\n' + lay("d", "Data", "", "data label", "data_param { batch_size: 8 }") + lay("r", "ReLU", "data"),
        "layer 'd' (Data) reads training data, so this is a training net; serve its deploy prototxt",
    ),
    "a V0 net": (
        'input: "data" input_dim: 1 input_dim: 1 input_dim: 2 input_dim: 2\nlayers { layer { name: "r" } }',
        "layer '#0' has no type (a V0 net?",
    ),
    "no input": (lay("r", "ReLU", "data"), "has 0 inputs (none); lrnserve serves nets with one input"),
    "two inputs": (
        deploy(lay("in2", "Input", "", "extra", "input_param { shape { dim: 1 } }") + lay("r", "ReLU", "data")),
        "has 2 inputs ('data', 'extra')",
    ),
    "input without shape": ('input: "data"\n' + lay("r", "ReLU", "data"), "input 'data' declares no shape"),
    "mismatched group": (
        deploy(conv("c", out=6, extra="kernel_size: 1 group: 3")),
        "input channels 4 are not divisible by group 3",
    ),
    "pool pad too large": (
        deploy(lay("p", "Pooling", "data", "", POOL % ("MAX", "kernel_size: 2 pad: 2"))),
        "pad (2, 2) must be smaller",
    ),
    "empty conv output": (
        deploy(conv("c", extra="kernel_size: 11")),
        "the output of an input of shape (2, 4, 9, 9) would be empty",
    ),
}


@pytest.mark.parametrize("case", list(NET_ERRORS))
def test_net_errors(tmp_path: Path, case: str) -> None:
    text, expected = NET_ERRORS[case]
    (tmp_path / "n.prototxt").write_text(text)
    message = load_error(caffe.read_net, tmp_path / "n.prototxt")
    assert message.startswith(str(tmp_path / "n.prototxt")) and expected in message, message


def test_unsupported_layers_are_kept_for_inspect_and_refused_by_the_runtime(tmp_path: Path) -> None:
    text = deploy(lay("act", "PReLU", "data") + lay("p", "Pooling", "act", "", POOL % ("STOCHASTIC", "kernel_size: 2")))
    (tmp_path / "u.prototxt").write_text(text)
    graph = caffe.read_net(tmp_path / "u.prototxt")
    reasons = [node.op.reason for node in graph.unsupported()]
    assert len(reasons) == 2 and "layer type 'PReLU' is not supported; supported: BatchNorm, Concat" in reasons[0]
    assert "STOCHASTIC" in reasons[1]
    message = load_error(GraphNetwork, graph)
    assert "layer 'act' (PReLU): layer type 'PReLU' is not supported" in message and "Convolution" in message


def test_fuzzed_caffemodels_give_only_load_errors(tmp_path: Path) -> None:
    prototxt, model = small(tmp_path, v1=True)
    valid = model.read_bytes()
    rng = np.random.default_rng(4)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(200):
        if case % 3 == 0:
            data = rng.bytes(int(rng.integers(0, 600)))
        elif case % 3 == 1:
            data = valid[: int(rng.integers(0, len(valid)))]
        else:
            flipped = bytearray(valid)
            for at in rng.integers(0, len(valid), int(rng.integers(1, 8))):
                flipped[at] = int(rng.integers(0, 256))
            data = bytes(flipped)
        path = tmp_path / f"fuzz{case}.caffemodel"
        path.write_bytes(data)
        try:
            caffe.read_net(prototxt, path)
            outcomes["loaded"] += 1
        except ir.ModelLoadError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100


# The real BVLC deploy prototxts ------------------------------------------------------------

BVLC = {
    # file: (input, output, LRN count, built-in network, logits layer)
    "bvlc_alexnet": ((10, 3, 227, 227), ("prob", (10, 1000)), 2, "alexnet", "fc8"),
    "bvlc_reference_caffenet": ((10, 3, 227, 227), ("prob", (10, 1000)), 2, "caffenet", "fc8"),
    "bvlc_googlenet": ((10, 3, 224, 224), ("prob", (10, 1000)), 2, "googlenet", "loss3/classifier"),
    "bvlc_reference_rcnn_ilsvrc13": ((10, 3, 227, 227), ("fc-rcnn", (10, 200)), 2, None, "fc-rcnn"),
    "cifar10_full": ((1, 3, 32, 32), ("prob", (1, 10)), 2, "cifar10_full", "ip1"),
}


@pytest.mark.parametrize("name", list(BVLC))
def test_bvlc_deploy_prototxts_import(name: str) -> None:
    shape, (output, out_shape), lrn_count, _, _ = BVLC[name]
    graph = caffe.read_net(SHARED / f"{name}.deploy.prototxt")
    assert graph.input == ir.Tensor("data", "data", shape) and graph.format == "caffe"
    assert (graph.output.name, graph.output.shape) == (output, out_shape)
    lrns = [node.op for node in graph.nodes if isinstance(node.op, ir.LRN)]
    region = "within" if name == "cifar10_full" else "across"
    assert len(lrns) == lrn_count and all(op.region == region and op.k == 1.0 for op in lrns)
    assert not list(graph.unsupported())
    pools = [node.op for node in graph.nodes if isinstance(node.op, ir.Pool)]
    assert pools and all(op.ceil and op.clip_last_window == (max(op.pads) > 0) for op in pools)


@pytest.fixture(scope="module")
def bvlc_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray], Path]]:
    """Per net: an input, the reference's blobs for it, and a caffemodel of the reference's
    weights (V1 with legacy blob shapes for AlexNet and cifar10, the current format otherwise)."""
    return {}


def bvlc_case(
    name: str, cache: dict[str, tuple[np.ndarray, dict[str, np.ndarray], Path]], folder: Path
) -> tuple[np.ndarray, dict[str, np.ndarray], Path]:
    if name not in cache:
        net = parse_net((SHARED / f"{name}.deploy.prototxt").read_text())
        shape = BVLC[name][0]
        x = np.random.default_rng(5).uniform(-120, 120, (1, *shape[1:])).astype(np.float32)
        want, weights = caffe_forward(net, x, seed=6)
        v1 = name in ("bvlc_alexnet", "cifar10_full")
        model = write_caffemodel(folder / f"{name}.caffemodel", weights, types=layer_types(net), v1=v1)
        cache[name] = (x, want, model)
    return cache[name]


@pytest.mark.parametrize("name", [n for n in BVLC if BVLC[n][3]])
def test_bvlc_nets_match_caffe_and_the_built_in_networks(
    name: str,
    bvlc_files: dict[str, tuple[np.ndarray, dict[str, np.ndarray], Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    x, want, model = bvlc_case(name, bvlc_files, tmp_path_factory.mktemp(name))
    _, (output, _), _, builtin_name, logits = BVLC[name]
    graph = caffe.read_net(SHARED / f"{name}.deploy.prototxt", model)
    assert rel_error(run(upto(graph, logits), x), want[logits]) < TOLERANCE
    probabilities = run(graph, x)
    assert rel_error(probabilities, want[output]) < TOLERANCE
    assert builtin_name is not None
    builtin = built_in_network(builtin_name, model)
    with torch.inference_mode():
        assert rel_error(builtin.logits(torch.from_numpy(x)).numpy(), want[logits]) < TOLERANCE
        assert rel_error(builtin(torch.from_numpy(x)).numpy(), probabilities) < TOLERANCE
    assert builtin.weights_source == str(model)


def test_built_in_networks_map_every_learned_layer() -> None:
    expected = {
        "alexnet": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"],
        "zfnet512": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"],
        "cifar10_full": ["conv1", "conv2", "conv3", "ip1"],
    }
    for name, cls in NETWORKS.items():
        with torch.device("meta"):  # shapes only, no memory
            network = cls()
        layers = list(network.caffe_layers())
        learned = [m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert sorted(map(id, learned)) == sorted(id(m) for _, m in layers), name
        names = [caffe_name for caffe_name, _ in layers]
        assert names == expected.get(name, names) and len(set(names)) == len(names)
        if name == "googlenet":
            assert names[:3] == ["conv1/7x7_s2", "conv2/3x3_reduce", "conv2/3x3"] and names[-1] == "loss3/classifier"
            assert "inception_4e/pool_proj" in names and len(names) == 3 + 9 * 6 + 1


def test_built_in_network_caffemodel_errors(tmp_path: Path) -> None:
    network = create_network("cifar10_full")
    weights = {name: [p.detach().numpy() * 2 for p in m.parameters()] for name, m in network.caffe_layers()}
    types = {name: "InnerProduct" if name == "ip1" else "Convolution" for name in weights}
    model = write_caffemodel(tmp_path / "c.caffemodel", weights, types=types, v1=True)
    fresh = built_in_network("cifar10_full", model)
    assert torch.equal(fresh.classifier.ip1.weight, torch.from_numpy(weights["ip1"][0]))
    missing = write_caffemodel(tmp_path / "m.caffemodel", {k: v for k, v in weights.items() if k != "ip1"}, types=types)
    message = load_error(partial(load_caffemodel, network), missing)
    assert "m.caffemodel: layer 'ip1' (InnerProduct): not in the caffemodel" in message and "(10, 1024)" in message
    wrong = {**weights, "conv2": [np.zeros((32, 32, 5, 4), np.float32), weights["conv2"][1]]}
    message = load_error(
        partial(load_caffemodel, network), write_caffemodel(tmp_path / "w.caffemodel", wrong, types=types)
    )
    assert (
        "layer 'conv2' (Convolution): blob 0 (weight) has shape (32, 32, 5, 4) in the caffemodel, "
        "the layer expects (32, 32, 5, 5)" in message
    )
    assert torch.equal(network.features.conv1.weight, fresh.features.conv1.weight / 2)  # a failed load changes nothing


def test_unpacked_and_double_blob_values(tmp_path: Path) -> None:
    """Writers without [packed = true] put one field per float; double_data wins over data, as in Caffe."""
    values = np.arange(6, dtype=np.float32) - 2.5
    shape = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3])).SerializeToString()
    unpacked = shape + b"".join(b"\x2d" + v.tobytes() for v in values)  # field 5, wire type 5, per value
    layer = caffe_pb2.LayerParameter(name="a").SerializeToString() + length_delimited(7, unpacked)
    both = caffe_pb2.LayerParameter(name="b")
    both.blobs.add(double_data=(values * 2).tolist(), data=values.tolist(), shape=caffe_pb2.BlobShape(dim=[6]))
    path = tmp_path / "u.caffemodel"
    path.write_bytes(length_delimited(100, layer) + length_delimited(100, both.SerializeToString()))
    assert len(caffe_pb2.NetParameter.FromString(path.read_bytes()).layer[0].blobs[0].data) == 6
    blobs = caffe.read_caffemodel(path)
    assert np.array_equal(blobs["a"][0], values.reshape(2, 3)) and np.array_equal(blobs["b"][0], values * 2)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pool_kernel_larger_than_the_input(tmp_path: Path, method: str) -> None:
    """Caffe's ceil rounding leaves one window clipped to a 2x2 input for kernel 3, stride 2."""
    text = deploy(lay("p", "Pooling", "data", "", POOL % (method, "kernel_size: 3 stride: 2")), (1, 2, 2, 2))
    assert check(tmp_path, text).output.shape == (1, 2, 1, 1)
