"""Caffe nets (text prototxt + binary caffemodel, current and legacy V1 formats) as an ``ir.Graph``.

Caffe's own rules decide what runs: the TEST-phase net (NetStateRule include/exclude), without
loss and accuracy layers; weights matched to layers by name as ``Net::CopyTrainedLayersFrom``
does, with legacy 4-D blob shapes compared the way ``Blob::ShapeEquals`` compares them. In-place
tops become fresh values, so every value is assigned once; Split tops are aliases. What each
layer type means is in ``caffe_layers``. Every failure is an ``ir.ModelLoadError`` with one line
naming the file and, where there is one, the layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from torch import nn

from ..models import LRNNetwork, ir
from .caffe_blobs import check_blobs, fit_blob, load_error, read_blob, read_caffemodel, read_file
from .caffe_layers import SUPPORTED, TRANSLATORS, BlobSpec, Layer, LayerContext, Shape, show
from .pb import caffe_pb2

logger = logging.getLogger(__name__)

# UpgradeV1LayerType (Caffe's upgrade_proto.cpp): the V1 enum's types by their current names.
V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}  # fmt: skip
DATA_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "AnnotatedData"}
TEST = caffe_pb2.TEST


def _parse_text(path: Path) -> caffe_pb2.NetParameter:
    try:
        text = read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise load_error(path, "not a text prototxt (binary data: is it the caffemodel?)") from None
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        detail = ir.first_line(exc).removeprefix(f"{line}:{column} : ")
        raise load_error(f"{path}:{line}:{column}", f"cannot parse the prototxt: {detail}") from None
    except Exception as exc:
        raise load_error(path, f"cannot parse the prototxt: {ir.first_line(exc)}") from None
    return net


# Layers -------------------------------------------------------------------------------------


def _meets(rule: caffe_pb2.NetStateRule, state: caffe_pb2.NetState) -> bool:
    """Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    return all(s in state.stage for s in rule.stage) and not any(s in state.stage for s in rule.not_stage)


def _layers(net: caffe_pb2.NetParameter, path: Path) -> list[Layer]:
    """The layers the TEST-phase net runs (Net::FilterNet), loss and accuracy layers left out."""
    if net.layer and net.layers:
        raise load_error(path, "mixes the 'layer' and the legacy 'layers' format")
    state = caffe_pb2.NetState(phase=TEST)
    kept = []
    messages: list[caffe_pb2.LayerParameter | caffe_pb2.V1LayerParameter] = [*net.layer, *net.layers]
    for index, message in enumerate(messages):
        v1 = isinstance(message, caffe_pb2.V1LayerParameter)
        if isinstance(message, caffe_pb2.V1LayerParameter):
            kind = V1_TYPES.get(caffe_pb2.V1LayerParameter.LayerType.Name(message.type), "")
        else:
            kind = message.type
        layer = Layer(message.name, kind, tuple(message.bottom), tuple(message.top), message, v1)
        if not layer.type:
            hint = " (a V0 net? upgrade it with Caffe's upgrade_net_proto_text)" if v1 else ""
            raise load_error(path, f"layer {layer.name or '#' + str(index)!r} has no type{hint}")
        if message.include and message.exclude:
            raise load_error(path, f"{layer.describe()}: give include or exclude rules, not both")
        included = not message.include
        if any(_meets(rule, state) for rule in message.exclude):
            included = False
        if any(_meets(rule, state) for rule in message.include):
            included = True
        if included and layer.type not in ("Accuracy", "Silence") and not layer.type.endswith("Loss"):
            kept.append(layer)
    return kept


def _inputs(net: caffe_pb2.NetParameter, layers: list[Layer], path: Path) -> list[tuple[str, Shape]]:
    """The net's input blobs and declared shapes: ``input`` with ``input_shape`` or ``input_dim``,
    and Input layers."""
    found: list[tuple[str, Shape]] = []
    names = list(net.input)
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise load_error(path, f"has {len(names)} input names but {len(net.input_shape)} input_shape entries")
        found += [(n, tuple(int(d) for d in s.dim)) for n, s in zip(names, net.input_shape, strict=True)]
    elif net.input_dim or names:
        if names and not net.input_dim:
            raise load_error(path, f"input {names[0]!r} declares no shape (input_shape or input_dim)")
        if len(net.input_dim) != 4 * len(names):
            raise load_error(path, f"has {len(names)} input names but {len(net.input_dim)} input_dim values (4 each)")
        found += [(n, tuple(int(d) for d in net.input_dim[4 * i : 4 * i + 4])) for i, n in enumerate(names)]
    for layer in layers:
        if layer.type in DATA_TYPES:
            raise load_error(
                path,
                f"{layer.describe()} reads training data, so this is a training net; "
                "serve its deploy prototxt (which declares the input's shape) instead",
            )
        if layer.type == "Input":
            shapes = layer.param("input_param", caffe_pb2.InputParameter).shape
            if len(shapes) not in (1, len(layer.tops)):
                raise load_error(path, f"{layer.describe()}: {len(shapes)} shapes for {len(layer.tops)} tops")
            for i, top in enumerate(layer.tops):
                found.append((top, tuple(int(d) for d in shapes[0 if len(shapes) == 1 else i].dim)))
    return found


class GraphBuilder:
    """The graph so far: values (each assigned once), their shapes, constants, and the blobs no
    layer has read yet (Caffe's net outputs are what is left)."""

    def __init__(
        self, prototxt: Path, weights: dict[str, list[np.ndarray]] | None, weights_path: Path | None, seed: int
    ) -> None:
        self.prototxt, self.weights, self.weights_path = prototxt, weights, weights_path
        self.rng = np.random.default_rng(seed)
        self.nodes: list[ir.Node] = []
        self.constants: dict[str, np.ndarray] = {}
        self.latest: dict[str, str] = {}  # blob name -> the value it holds now
        self.shapes: dict[str, Shape | None] = {}
        self.taken: set[str] = set()
        self.unread: dict[str, None] = {}  # an ordered set of blob names

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}#{n}"
        self.taken.add(name)
        return name

    def layer_error(self, layer: Layer, message: str) -> ir.ModelLoadError:
        return load_error(self.prototxt, f"{layer.describe()}: {message}")

    def set_input(self, blob: str, shape: Shape) -> str:
        value = self.fresh(blob)
        self.latest[blob], self.shapes[value], self.unread[blob] = value, shape, None
        return value

    def add_layer(self, layer: Layer) -> None:
        for bottom in layer.bottoms:
            if bottom not in self.latest:
                raise self.layer_error(layer, f"bottom {bottom!r} is not produced by any layer before it")
        inputs = [self.latest[b] for b in layer.bottoms]
        for bottom in layer.bottoms:
            self.unread.pop(bottom, None)
        if layer.type == "Split":
            if len(inputs) != 1:
                raise self.layer_error(layer, f"has {len(inputs)} bottoms, Split takes 1")
            self.latest.update(dict.fromkeys(layer.tops, inputs[0]))
        else:
            if not layer.tops:
                raise self.layer_error(layer, "has no top")
            context = LayerContext(self, layer, inputs, [self.shapes[v] for v in inputs])
            translate = TRANSLATORS.get(layer.type)
            if translate is None:
                context.unsupported(f"layer type {layer.type!r} is not supported; supported: {', '.join(SUPPORTED)}")
            else:
                translate(context)
        self.unread.update(dict.fromkeys(layer.tops))

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
    ) -> str:
        if top:
            outputs = [self.fresh(t) for t in layer.tops]
            self.latest.update(zip(layer.tops, outputs, strict=True))
            name = layer.name
        else:
            outputs, name = [self.fresh(f"{layer.tops[0]}#{suffix}")], f"{layer.name}#{suffix}"
        self.shapes.update(dict.fromkeys(outputs[1:]))
        self.shapes[outputs[0]] = shape
        self.nodes.append(ir.Node(name, layer.source, op, tuple(inputs), tuple(outputs), details))
        return outputs[0]

    def add_constant(self, name: str, array: np.ndarray) -> str:
        name = self.fresh(name)
        self.constants[name] = array
        return name

    def layer_blobs(self, layer: Layer, specs: Sequence[BlobSpec]) -> list[np.ndarray] | None:
        """The layer's blobs from the caffemodel (checked), or seeded random ones; None when
        random ones cannot be made because a shape is unknown."""
        if not specs:
            return []
        if self.weights is not None:
            assert self.weights_path is not None
            return check_blobs(self.weights_path, layer.describe(), self.weights.get(layer.name), specs)
        if any(s.shape is None or None in s.shape for s in specs):
            return None
        arrays = []
        for spec in specs:
            shape = tuple(d or 0 for d in spec.shape or ())
            if spec.init == "uniform":
                bound = 1.0 / math.sqrt(max(spec.fan_in, 1))
                unit = self.rng.random(shape, dtype=np.float32) * np.float32(2.0) - np.float32(1.0)
                arrays.append(unit * np.float32(bound))
            else:
                arrays.append((np.ones if spec.init == "ones" else np.zeros)(shape, np.float32))
        return arrays


def read_net(prototxt: Path, weights: Path | None = None, *, seed: int = 0) -> ir.Graph:
    """A Caffe net from its prototxt, with the caffemodel's weights, or seeded random ones
    (uniform in +-1/sqrt(fan_in); BatchNorm mean 0, variance 1; Scale 1, bias 0)."""
    prototxt = Path(prototxt)
    weights = None if weights is None else Path(weights)
    net = _parse_text(prototxt)
    layers = _layers(net, prototxt)
    inputs = _inputs(net, layers, prototxt)
    if len(inputs) != 1:
        named = ", ".join(repr(name) for name, _ in inputs) or "none"
        raise load_error(prototxt, f"has {len(inputs)} inputs ({named}); lrnserve serves nets with one input")
    blob, shape = inputs[0]
    if not shape or any(d <= 0 for d in shape):
        raise load_error(prototxt, f"input {blob!r} has shape {show(shape)}; every dim must be positive")
    blobs = None if weights is None else read_caffemodel(weights)
    builder = GraphBuilder(prototxt, blobs, weights, seed)
    input_value = builder.set_input(blob, shape)
    for layer in layers:
        if layer.type != "Input":
            builder.add_layer(layer)
    outputs = list(builder.unread)
    if len(outputs) != 1:
        raise load_error(
            prototxt,
            f"has {len(outputs)} outputs (blobs no layer reads: {', '.join(map(repr, outputs)) or 'none'}); "
            "lrnserve serves nets with one output",
        )
    if not builder.nodes:
        raise load_error(prototxt, "has no layers to run")
    value = builder.latest[outputs[0]]
    return ir.Graph(
        name=net.name or prototxt.stem,
        format="caffe",
        origin=str(prototxt) if weights is None else f"{prototxt} + {weights}",
        input=ir.Tensor(blob, input_value, shape),
        output=ir.Tensor(outputs[0], value, builder.shapes.get(value)),
        nodes=builder.nodes,
        constants=builder.constants,
    )


def weights_for(
    path: Path, blobs: Mapping[str, Sequence[np.ndarray]], layer: str, kind: str, expected: Sequence[tuple[str, Shape]]
) -> list[np.ndarray]:
    """For the built-in networks: ``layer``'s blobs (read by ``read_caffemodel``) checked against
    ``expected`` (role, shape) pairs, with read_net's rules and messages."""
    specs = [BlobSpec(role, shape) for role, shape in expected]
    return check_blobs(path, f"layer {layer!r} ({kind})", blobs.get(layer), specs)


def load_into(network: LRNNetwork, path: Path) -> None:
    """A built-in network's Conv2d/Linear weights from the caffemodel's layers of the same Caffe
    name (``network.caffe_layers``), as Caffe's CopyTrainedLayersFrom matches them; the file's
    other layers are ignored. Every layer is checked before any weight is copied."""
    blobs = read_caffemodel(path)
    loaded = []
    for layer, module in network.caffe_layers():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{network.name}: Caffe layer {layer!r} maps to a {type(module).__name__}")
        kind = "Convolution" if isinstance(module, nn.Conv2d) else "InnerProduct"
        expected = [("weight", tuple(module.weight.shape))]
        if module.bias is not None:
            expected.append(("bias", tuple(module.bias.shape)))
        loaded.append((module, weights_for(path, blobs, layer, kind, expected)))
    with torch.no_grad():
        for module, arrays in loaded:
            module.weight.copy_(torch.from_numpy(arrays[0]))
            if module.bias is not None:
                module.bias.copy_(torch.from_numpy(arrays[1]))
    network.weights_source = str(path)
    logger.info("%s: loaded weights from %s", network.name, path)


__all__ = ["check_blobs", "fit_blob", "load_into", "read_blob", "read_caffemodel", "read_net", "weights_for"]
