"""An ``ir.Graph`` written as an ONNX model (``lrnserve convert``), through lrnserve's own ONNX
subset: the server needs no onnx package.

Every ir operation means one thing (``models.ir``); this module writes that meaning in
standard ONNX ops that onnxruntime runs, not the closest-looking op. Shape-dependent choices
(pooling's explicit pads and divisor correction, legacy broadcasting) come from the sample
shapes of the network's trial run, so the file takes any batch size but only the sample shape
it was traced with. An operation ONNX cannot express is an ``ExportError`` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..models import graph_ops, ir
from ..models.runtime import GraphNetwork
from .pb import onnx_pb2

DEFAULT_OPSET = 13
OPSETS = range(13, 22)  # every op written here means the same from opset 13 to 21
_IR_VERSION = {13: 7, 14: 8, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
_FLOAT, _INT64 = onnx_pb2.TensorProto.FLOAT, onnx_pb2.TensorProto.INT64
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "max": "Max", "min": "Min"}
_ACTIVATION = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "identity": "Identity"}
_VARIADIC = {"sum": "Sum", "max": "Max", "min": "Min"}

Attr = int | float | str | Sequence[int] | Sequence[float] | np.ndarray


class ExportError(ir.ModelLoadError):
    """A graph (or one node of it) that ONNX cannot express; one line naming the node."""


def _raw(array: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 or int64, little-endian (ONNX's raw_data)."""
    if array.dtype.kind == "f":
        return np.ascontiguousarray(array, dtype="<f4"), _FLOAT
    if array.dtype.kind in "iub":
        return np.ascontiguousarray(array, dtype="<i8"), _INT64
    raise ValueError(f"a constant has dtype {array.dtype}, which the export does not write")


def tensor_proto(name: str, array: np.ndarray) -> onnx_pb2.TensorProto:
    data, kind = _raw(array)
    return onnx_pb2.TensorProto(name=name, dims=list(array.shape), data_type=kind, raw_data=data.tobytes())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    """A length-delimited field's tag and length (protobuf wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _initializer(name: str, array: np.ndarray) -> list[bytes | memoryview]:
    """GraphProto.initializer (field 5) in wire format, the weights written straight from the
    array: putting 240 MB of AlexNet through protobuf message objects costs seconds."""
    data, kind = _raw(array)
    head = onnx_pb2.TensorProto(name=name, dims=list(array.shape), data_type=kind).SerializeToString()
    raw = data.reshape(-1).data.cast("B") if data.size else memoryview(b"")
    raw_header = _field_header(9, raw.nbytes)  # TensorProto.raw_data
    return [_field_header(5, len(head) + len(raw_header) + raw.nbytes), head, raw_header, raw]


def _attribute(name: str, value: Attr) -> onnx_pb2.AttributeProto:
    kinds = onnx_pb2.AttributeProto
    if isinstance(value, np.ndarray):
        return kinds(name=name, type=kinds.TENSOR, t=tensor_proto("", value))
    if isinstance(value, bool | int):
        return kinds(name=name, type=kinds.INT, i=int(value))
    if isinstance(value, float):
        return kinds(name=name, type=kinds.FLOAT, f=value)
    if isinstance(value, str):
        return kinds(name=name, type=kinds.STRING, s=value.encode())
    if all(isinstance(v, int) for v in value):
        return kinds(name=name, type=kinds.INTS, ints=[int(v) for v in value])
    return kinds(name=name, type=kinds.FLOATS, floats=[float(v) for v in value])


class _Writer:
    """Builds the GraphProto: ONNX names for ir values, initializers on first use, helper nodes."""

    def __init__(self, graph: ir.Graph, shapes: dict[str, tuple[int, ...]], opset: int, batched: bool) -> None:
        self.graph, self.shapes, self.opset, self.batched = graph, shapes, opset, batched
        self.proto = onnx_pb2.GraphProto(name=graph.name)
        self.used: set[str] = {graph.input.name, graph.output.name}
        self.node_names: set[str] = set()
        self.initializers: list[tuple[str, np.ndarray]] = []
        self.names = {graph.output.value: graph.output.name, graph.input.value: graph.input.name}
        self.node: ir.Node | None = None

    def error(self, why: str) -> ExportError:
        node = self.node
        kind = "layer" if self.graph.format == "caffe" else "node"
        where = f"{kind} '{node.name}' ({node.source})" if node else "graph"
        return ExportError(f"{self.graph.origin}: {where}: cannot export to ONNX: {why}")

    def fresh(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.used if taken is None else taken
        name, count = base, 1
        while name in taken:
            name, count = f"{base}_{count}", count + 1
        taken.add(name)
        return name

    def value(self, name: str) -> str:
        """The ONNX name of ir value ``name`` ("" stays absent); a constant becomes an initializer."""
        if not name:
            return ""
        if name not in self.names:
            self.names[name] = self.fresh(name)
            if name in self.graph.constants:
                self.initializers.append((self.names[name], self.graph.constants[name]))
        return self.names[name]

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append((name, array))
        return name

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def scalar(self, base: str, value: float) -> str:
        return self.const(base, np.asarray(value, dtype=np.float32))

    def emit(self, op_type: str, inputs: Sequence[str], output: str | None = None, /, **attrs: Attr | None) -> str:
        """Add a node; its output is ``output`` or a fresh helper value named after the ir node."""
        assert self.node is not None
        out = output or self.fresh(f"{self.node.name}/{op_type.lower()}")
        name = self.fresh(self.node.name if output else out, self.node_names)
        node = self.proto.node.add(name=name, op_type=op_type, input=list(inputs), output=[out])
        node.attribute.extend(_attribute(key, value) for key, value in attrs.items() if value is not None)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def constant(self, name: str) -> np.ndarray | None:
        return self.graph.constants.get(name)


Exporter = Callable[[_Writer, ir.Node, list[str], str], None]


def _conv(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    op = node.op
    assert isinstance(op, ir.Conv)
    kernel = w.shape(node.inputs[1])[2:]
    pads = list(op.pads)
    if op.auto_pad != "NOTSET":
        h, wd = w.shape(node.inputs[0])[2:]
        pads[0], pads[2] = graph_ops.same_pads(h, kernel[0], op.stride[0], op.dilation[0], op.auto_pad)
        pads[1], pads[3] = graph_ops.same_pads(wd, kernel[1], op.stride[1], op.dilation[1], op.auto_pad)
    w.emit("Conv", ins, out, kernel_shape=kernel, strides=op.stride, pads=pads, dilations=op.dilation, group=op.group)


def _pool(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    """Caffe's (or ONNX's) rounding as explicit floor-mode pads; AVE's divisor made exact."""
    op = node.op
    assert isinstance(op, ir.Pool)
    avg = op.method == "avg"
    if op.global_pool:
        w.emit("GlobalAveragePool" if avg else "GlobalMaxPool", ins, out)
        return
    extent = w.shape(node.inputs[0])[2:]
    begin, end = [op.pads[0], op.pads[1]], [op.pads[2], op.pads[3]]
    if op.auto_pad != "NOTSET":
        for axis in (0, 1):
            begin[axis], end[axis] = graph_ops.same_pads(extent[axis], op.kernel[axis], op.stride[axis], 1, op.auto_pad)
    try:
        sizes = [
            graph_ops.pool_output_size(extent[a], op.kernel[a], op.stride[a], begin[a], end[a], op) for a in (0, 1)
        ]
    except ValueError as exc:
        raise w.error(str(exc)) from None
    # The end pad that makes floor rounding give exactly these windows; never below zero (the
    # floor then drops the surplus: it is always less than a stride).
    covered = [max((sizes[a] - 1) * op.stride[a] + op.kernel[a] - extent[a] - begin[a], 0) for a in (0, 1)]
    x, pool_begin, pool_end = ins[0], begin, covered
    if any(p >= k for p, k in zip(begin + covered, op.kernel * 2, strict=True)):
        # onnxruntime rejects a pad as large as the kernel: pad explicitly instead.
        fill = w.scalar(f"{node.name}/fill", 0.0 if avg else -math.inf)
        pads = w.ints(f"{node.name}/pads", [0, 0, *begin, 0, 0, *covered])
        x = w.emit("Pad", [x, pads, fill], mode="constant")
        pool_begin, pool_end = [0, 0], [0, 0]
    attrs: dict[str, Attr] = {"kernel_shape": op.kernel, "strides": op.stride, "pads": pool_begin + pool_end}
    if not avg:
        w.emit("MaxPool", [x], out, **attrs)
        return
    # ONNX's divisor: the window clipped to the padded extent it sees with count_include_pad,
    # else to its input; ir's: clipped to the file's own padded extent, or to the image.
    padded = x != ins[0]
    cip = op.count_include_pad or padded
    ours, theirs = [], []
    for a in (0, 1):
        offsets = np.arange(sizes[a], dtype=np.float64) * op.stride[a]
        starts, kernel = offsets - begin[a], op.kernel[a]
        if op.count_include_pad:
            ours.append(np.maximum(np.minimum(starts + kernel, extent[a] + end[a]) - starts, 1))
        else:
            ours.append(np.maximum(np.minimum(starts + kernel, extent[a]) - np.maximum(starts, 0), 1))
        seen = extent[a] + (begin[a] + covered[a] if padded else 0)
        starts = offsets - pool_begin[a]
        if cip:
            theirs.append(np.minimum(starts + kernel, seen + pool_end[a]) - starts)
        else:
            theirs.append(np.minimum(starts + kernel, seen) - np.maximum(starts, 0))
    correction = np.outer(*theirs) / np.outer(*ours)
    if np.all(correction == 1.0):
        w.emit("AveragePool", [x], out, count_include_pad=int(cip), **attrs)
        return
    pooled = w.emit("AveragePool", [x], count_include_pad=int(cip), **attrs)
    w.emit("Mul", [pooled, w.const(f"{node.name}/divisor", correction[None, None].astype(np.float32))], out)


def _lrn(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    """ONNX LRN where it means the same (across channels, odd size); otherwise the definition
    in standard ops: ``x / (k + alpha * mean of x^2 over the window)^beta``, the mean over
    the full window (zeros outside), which AveragePool with count_include_pad computes."""
    op = node.op
    assert isinstance(op, ir.LRN)
    n = op.size
    if op.region == "across" and n % 2 == 1:
        w.emit("LRN", ins, out, size=n, alpha=float(op.alpha), beta=float(op.beta), bias=float(op.k))
        return
    before = n // 2 if op.extra_neighbour == "before" else (n - 1) // 2
    after = n - 1 - before
    square = w.emit("Mul", [ins[0], ins[0]])
    if op.region == "across":  # pool over channels: [N, 1, C, H, W] with a (n, 1, 1) window
        lifted = w.emit("Unsqueeze", [square, w.ints(f"{node.name}/axes", [1])])
        pooled = w.emit(
            "AveragePool", [lifted], kernel_shape=[n, 1, 1], pads=[before, 0, 0, after, 0, 0], count_include_pad=1
        )
        mean = w.emit("Squeeze", [pooled, w.ints(f"{node.name}/axes", [1])])
    else:
        pads = [before, before, after, after]
        mean = w.emit("AveragePool", [square], kernel_shape=[n, n], pads=pads, count_include_pad=1)
    scaled = w.emit("Mul", [mean, w.scalar(f"{node.name}/alpha", op.alpha)])
    shifted = w.emit("Add", [scaled, w.scalar(f"{node.name}/k", op.k)])
    denominator = w.emit("Pow", [shifted, w.scalar(f"{node.name}/beta", op.beta)])
    w.emit("Div", [ins[0], denominator], out)


def _inner_product(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    op = node.op
    assert isinstance(op, ir.InnerProduct)
    rank = len(w.shape(node.inputs[0]))
    axis = op.axis % rank
    bias = ins[2] if len(ins) > 2 else ""
    if axis == 1:
        flat = ins[0] if rank == 2 else w.emit("Flatten", [ins[0]], axis=1)
        w.emit("Gemm", [flat, ins[1], *([bias] if bias else [])], out, transB=0 if op.transpose else 1)
        return
    flat = w.emit("Reshape", [ins[0], w.ints(f"{node.name}/shape", [0] * axis + [-1])])
    weight = ins[1] if op.transpose else w.emit("Transpose", [ins[1]], perm=[1, 0])
    if bias:
        w.emit("Add", [w.emit("MatMul", [flat, weight]), bias], out)
    else:
        w.emit("MatMul", [flat, weight], out)


def _binary(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    """ONNX's old ``broadcast=1`` (Caffe's Scale/Bias axis): b gets trailing 1s so numpy
    broadcasting lines its dims up with a's from ``legacy_axis`` on."""
    op = node.op
    assert isinstance(op, ir.Binary)
    a, b = ins[0], ins[1]
    if op.legacy_axis is not None:
        rank_a, rank_b = len(w.shape(node.inputs[0])), len(w.shape(node.inputs[1]))
        extra = rank_a - (op.legacy_axis % rank_a if rank_a else 0) - rank_b
        if extra < 0:
            raise w.error(f"operand of rank {rank_b} does not fit at axis {op.legacy_axis} of rank {rank_a}")
        constant = w.constant(node.inputs[1])
        if extra and constant is not None:
            b = w.const(f"{node.inputs[1]}/aligned", constant.reshape(*constant.shape, *[1] * extra))
        elif extra:
            b = w.emit("Unsqueeze", [b, w.ints(f"{node.name}/axes", list(range(rank_b, rank_b + extra)))])
    w.emit(_BINARY[op.op], [a, b], out)


def _variadic(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    op = node.op
    assert isinstance(op, ir.Variadic)
    terms = [x for x in ins if x]
    if op.coefficients is not None:
        terms = [
            x if c == 1.0 else w.emit("Mul", [x, w.scalar(f"{node.name}/coeff", c)])
            for x, c in zip(terms, op.coefficients, strict=True)
        ]
    if op.op == "prod" or len(terms) == 1:
        result = terms[0]
        for index, term in enumerate(terms[1:], 2):
            result = w.emit("Mul", [result, term], out if index == len(terms) else None)
        if len(terms) == 1:
            w.emit("Identity", [result], out)
        return
    w.emit(_VARIADIC[op.op], terms, out)


def _softmax(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    op = node.op
    assert isinstance(op, ir.Softmax)
    rank = len(w.shape(node.inputs[0]))
    axis = op.axis % rank
    if not op.coerce_2d or axis == rank - 1:
        w.emit("Softmax", ins, out, axis=axis)
        return
    shape = w.emit("Shape", [ins[0]])
    flat = w.emit("Flatten", [ins[0]], axis=axis)
    w.emit("Reshape", [w.emit("Softmax", [flat], axis=1), shape], out)


def _flatten(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    op = node.op
    assert isinstance(op, ir.Flatten)
    shape = w.shape(node.inputs[0])
    if op.end_axis is None:
        w.emit("Flatten", ins, out, axis=op.axis)
        return
    axis, end = op.axis % len(shape), op.end_axis % len(shape)
    target = [0] * axis + [-1] + list(shape[end + 1 :])  # 0 copies the dim at the same index
    w.emit("Reshape", [ins[0], w.ints(f"{node.name}/shape", target)], out)


def _reshape(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    """A batch size baked into the target becomes 0 where lrnserve proved it is the batch."""
    op = node.op
    assert isinstance(op, ir.Reshape)
    target, shape = list(op.shape), w.shape(node.inputs[0])
    if (
        w.batched
        and target
        and not op.allowzero
        and shape
        and target[0] == shape[0] == w.shapes[w.graph.input.value][0]
    ):
        rest = [d for d in target[1:] if d > 0]
        if all(d != 0 for d in target[1:]) and math.prod(shape[1:]) % max(math.prod(rest), 1) == 0:
            target[0] = 0
    if op.allowzero and 0 in target and w.opset < 14:
        raise w.error("Reshape with allowzero needs opset 14 or later")
    allowzero = int(op.allowzero) if w.opset >= 14 and op.allowzero else None
    w.emit("Reshape", [ins[0], w.ints(f"{node.name}/shape", target)], out, allowzero=allowzero)


def _simple(w: _Writer, node: ir.Node, ins: list[str], out: str) -> None:
    """The ops ONNX has with the same meaning and parameters."""
    op = node.op
    if isinstance(op, ir.Activation):
        if op.op == "relu" and op.negative_slope:
            w.emit("LeakyRelu", ins, out, alpha=float(op.negative_slope))
        else:
            w.emit(_ACTIVATION[op.op], ins, out)
    elif isinstance(op, ir.Clip):
        low = "" if op.minimum is None else w.scalar(f"{node.name}/min", op.minimum)
        high = "" if op.maximum is None else w.scalar(f"{node.name}/max", op.maximum)
        w.emit("Clip", [ins[0], low, high] if high else [ins[0], low] if low else [ins[0]], out)
    elif isinstance(op, ir.Concat):
        w.emit("Concat", ins, out, axis=op.axis)
    elif isinstance(op, ir.Transpose):
        w.emit("Transpose", ins, out, perm=list(op.perm) if op.perm is not None else None)
    elif isinstance(op, ir.Squeeze):
        axes = [] if op.axes is None else [w.ints(f"{node.name}/axes", op.axes)]
        w.emit("Squeeze", [ins[0], *axes], out)
    elif isinstance(op, ir.Unsqueeze):
        w.emit("Unsqueeze", [ins[0], w.ints(f"{node.name}/axes", op.axes)], out)
    elif isinstance(op, ir.BatchNorm):
        w.emit("BatchNormalization", ins, out, epsilon=float(op.epsilon))
    elif isinstance(op, ir.Gemm):
        w.emit(
            "Gemm", ins, out, alpha=float(op.alpha), beta=float(op.beta), transA=int(op.trans_a), transB=int(op.trans_b)
        )
    elif isinstance(op, ir.MatMul):
        w.emit("MatMul", ins, out)
    elif isinstance(op, ir.ConstantOfShape):
        dtype = np.int64 if op.dtype.startswith("int") else np.float32
        w.emit("ConstantOfShape", ins, out, value=np.asarray([op.value], dtype=dtype))
    elif isinstance(op, ir.Unsupported):
        raise w.error(op.reason)
    else:
        raise w.error(f"no ONNX form for {type(op).__name__}")


_EXPORTERS: dict[type, Exporter] = {
    ir.Conv: _conv,
    ir.Pool: _pool,
    ir.LRN: _lrn,
    ir.InnerProduct: _inner_product,
    ir.Binary: _binary,
    ir.Variadic: _variadic,
    ir.Softmax: _softmax,
    ir.Flatten: _flatten,
    ir.Reshape: _reshape,
}


def _value_info(name: str, dims: Sequence[int | str]) -> onnx_pb2.ValueInfoProto:
    info = onnx_pb2.ValueInfoProto(name=name)
    info.type.tensor_type.elem_type = _FLOAT
    for dim in dims:
        entry = info.type.tensor_type.shape.dim.add()
        if isinstance(dim, str):
            entry.dim_param = dim
        else:
            entry.dim_value = dim
    return info


def export(graph: ir.Graph, network: GraphNetwork | None = None, opset: int = DEFAULT_OPSET) -> bytes:
    """The serialized ModelProto. ``network``: the graph built (for its traced shapes); built
    here when not given, so a graph lrnserve cannot run is not exported either."""
    if opset not in OPSETS:
        raise ExportError(f"{graph.origin}: cannot export to ONNX opset {opset}; supported: 13 to 21")
    for node in graph.unsupported():
        failed = _Writer(graph, {}, opset, False)
        failed.node = node
        raise failed.error(node.op.reason)  # type: ignore[union-attr]
    network = network if network is not None else GraphNetwork(graph)
    writer = _Writer(graph, network.value_shapes, opset, network.per_sample is None)
    for node in graph.nodes:
        writer.node = node
        ins = [writer.value(name) for name in node.inputs]
        while ins and not ins[-1]:
            ins.pop()
        out = writer.value(node.outputs[0])
        _EXPORTERS.get(type(node.op), _simple)(writer, node, ins, out)
    writer.node = None
    if graph.output.value == graph.input.value:  # a graph that computes nothing
        writer.proto.node.add(name="identity", op_type="Identity", input=[graph.input.name], output=[graph.output.name])
    writer.proto.input.append(_value_info(graph.input.name, ["N", *network.input_shape]))
    writer.proto.output.append(_value_info(graph.output.name, ["N", *network.output_shape]))
    from lrnserve.client.version import __version__

    model = onnx_pb2.ModelProto(ir_version=_IR_VERSION[opset], producer_name="lrnserve", producer_version=__version__)
    model.opset_import.add(domain="", version=opset)
    model.doc_string = f"{graph.format} model {graph.origin}, exported by lrnserve"
    # ModelProto.graph (field 7): the nodes, then the initializers, concatenated on the wire.
    chunks: list[bytes | memoryview] = [writer.proto.SerializeToString()]
    for name, array in writer.initializers:
        chunks += _initializer(name, array)
    size = sum(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes for chunk in chunks)
    return b"".join([model.SerializeToString(), _field_header(7, size), *chunks])
