"""ONNX files for the importer's tests, built with the onnx package (never with lrnserve code),
and the references they are checked against: onnxruntime, or basic ONNX ops run in it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, version_converter

LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"
Shape = Sequence[int | str | None] | None


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Shape]],
    outputs: Sequence[tuple[str, Shape]],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 13,
    ir_version: int | None = None,
) -> onnx.ModelProto:
    """A model of float tensors; with ``ir_version`` < 4 the initializers are also listed as
    graph inputs, as the old zoo files do."""
    initializers = initializers or {}
    tensors = [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()]
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs]
    if ir_version is not None and ir_version < 4:
        values += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(
        list(nodes),
        "test_graph",
        values,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        tensors,
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lrnserve-tests")
    built.ir_version = ir_version if ir_version is not None else min(onnx.IR_VERSION, 10)
    return built


def single(
    op_type: str,
    shape: Sequence[int],
    /,
    opset: int = 13,
    extra_inputs: Sequence[str] = (),
    initializers: dict[str, np.ndarray] | None = None,
    outputs: Sequence[str] = ("y",),
    **attributes: object,
) -> onnx.ModelProto:
    """One node reading graph input "x" (then ``extra_inputs``), its first output the graph's."""
    node = helper.make_node(op_type, ["x", *extra_inputs], list(outputs), name=f"{op_type.lower()}_node", **attributes)
    return model([node], [("x", list(shape))], [(outputs[0], None)], initializers, opset)


def upgraded(old: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The same model at a newer opset (onnxruntime runs no ai.onnx opset below 7)."""
    return version_converter.convert_version(old, opset)


def session(built: onnx.ModelProto | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    data = built if isinstance(built, bytes) else built.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_run(built: onnx.ModelProto | bytes | ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    runner = built if isinstance(built, ort.InferenceSession) else session(built)
    (out,) = runner.run(None, {runner.get_inputs()[0].name: x})
    return np.asarray(out)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0)) / scale


def lrn_in_basic_ops(shape: Sequence[int], size: int, alpha: float, beta: float, bias: float) -> onnx.ModelProto:
    """ONNX's LRN written out (its spec's window ``[c - floor((n-1)/2), c + ceil((n-1)/2)]``) as a
    sum of squares by a ones-kernel Conv over the channel axis, for the sizes onnxruntime's LRN
    refuses (even ones)."""
    n, c, h, w = shape
    before, after = (size - 1) // 2, size // 2
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Reshape", ["sq", "as_planes"], ["planes"]),
        helper.make_node("Conv", ["planes", "ones"], ["sums"], pads=[before, 0, after, 0]),
        helper.make_node("Reshape", ["sums", "as_input"], ["total"]),
        helper.make_node("Mul", ["total", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["base"]),
        helper.make_node("Pow", ["base", "beta"], ["divisor"]),
        helper.make_node("Div", ["x", "divisor"], ["y"]),
    ]
    constants = {
        "as_planes": np.array([n, 1, c, h * w], dtype=np.int64),
        "ones": np.ones((1, 1, size, 1), dtype=np.float32),
        "as_input": np.array(shape, dtype=np.int64),
        "scale": np.array(alpha / size, dtype=np.float32),
        "bias": np.array(bias, dtype=np.float32),
        "beta": np.array(beta, dtype=np.float32),
    }
    return model(nodes, [("x", list(shape))], [("y", list(shape))], constants, opset=13)


def light_path(name: str) -> Path:
    return LIGHT / f"light_{name}.onnx"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            found.setdefault(name, []).append((node, index))
    return found


def _classifier(graph: onnx.GraphProto) -> tuple[str, str] | None:
    """The weight and bias of the Conv/Gemm nearest the output (through single-input ops),
    each traced back through Reshapes (inception_v1 reshapes its Gemm weight)."""
    producer = {out: node for node in graph.node for out in node.output}

    def source(value: str) -> str:
        while value in producer and producer[value].op_type == "Reshape":
            value = producer[value].input[0]
        return value

    value = graph.output[0].name
    while value in producer:
        node = producer[value]
        if node.op_type in ("Conv", "Gemm"):
            return (source(node.input[1]), source(node.input[2])) if len(node.input) > 2 else None
        value = node.input[0]
    return None


def _random_weight(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    value: str,
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]],
) -> np.ndarray:
    """Realistic magnitudes, so that no layer's output is trivial: He-normal weights, small
    biases, batch-norm statistics near their trained ranges, scale factors near 1."""
    node, index = next(iter(consumers.get(value, [])), (None, -1))
    while node is not None and node.op_type in ("Unsqueeze", "Reshape"):  # e.g. Caffe's Scale: Unsqueeze, Mul
        node, index = next(iter(consumers.get(node.output[0], [])), (None, -1))
    kind = (node.op_type, index) if node is not None else ("", -1)
    if kind in (("Conv", 1), ("Gemm", 1)):
        transposed = node is not None and any(a.name == "transB" and a.i for a in node.attribute)
        fan_in = int(np.prod(shape[1:])) if kind[0] == "Conv" or transposed else shape[0]
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    if kind in (("BatchNormalization", 1), ("BatchNormalization", 4)) or kind[0] == "Mul":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if kind[0] == "BatchNormalization":
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    return rng.normal(0.0, 0.05, shape).astype(np.float32)


def _key(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    encoded = bytearray()
    for value in (number << 3 | 2, length):
        while True:
            encoded.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                break
    return bytes(encoded)


def _small_model(
    template: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    weights: dict[str, np.ndarray],
    inline: set[str],
    extra_output: str = "",
) -> bytes:
    """The model with only the weights in ``inline`` (all of them listed as graph inputs)."""
    built = onnx.ModelProto()
    built.CopyFrom(template)
    graph = built.graph
    used = {name for node in nodes for name in node.input}
    known = {t.name for t in template.graph.initializer}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(weights[key], key) for key in sorted(inline)])
    data = [value for value in graph.input if value.name not in known]  # first, where onnxruntime looks for it
    inputs = data + [value for value in graph.input if value.name in used and value.name in known]
    inputs += [helper.make_tensor_value_info(key, TensorProto.FLOAT, value.shape) for key, value in weights.items()]
    del graph.input[:]
    graph.input.extend(inputs)
    if extra_output:
        graph.output.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    return built.SerializeToString()


def _weight_chunks(weights: dict[str, np.ndarray], skip: set[str]) -> bytes:
    """Weights as ``graph { initializer { ... raw_data } }`` chunks to append to a model's bytes.

    Protobuf merges a message field that occurs twice, so ``small + chunks`` is the whole model.
    Encoded by hand so that the weights are copied once (this machine copies ~300 MB/s), and
    once for both the calibration model and the final one."""
    pieces: list[bytes | memoryview] = []
    for key, value in weights.items():
        if key in skip:
            continue
        header = TensorProto(name=key, dims=value.shape, data_type=TensorProto.FLOAT).SerializeToString()
        raw = memoryview(np.ascontiguousarray(value, dtype="<f4")).cast("B")
        tensor = len(header) + len(_key(9, raw.nbytes)) + raw.nbytes
        graph = len(_key(5, tensor)) + tensor
        pieces += [_key(7, graph), _key(5, tensor), header, _key(9, raw.nbytes), raw]
    return b"".join(pieces)


def light_with_weights(name: str, seed: int = 0, input_scale: float = 1.0) -> tuple[bytes, ort.InferenceSession]:
    """A Model Zoo light graph with its ConstantOfShape weights replaced by seeded random
    initializers (listed among the graph inputs: the files are IR version 3), and an
    onnxruntime session of it.

    Where the graph ends in a softmax, the classifier's weight and bias are scaled (starting
    from 1/``input_scale``) until, for inputs of ``input_scale``, the logits have a standard
    deviation between 1 and 10: a softmax that is neither one-hot nor flat. The logits' spread
    is that of log(softmax), so no other output is needed."""
    template = onnx.load(str(light_path(name)))
    graph = template.graph
    consumers = _consumers(graph)
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rng = np.random.default_rng(seed)
    nodes, weights = [], {}
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[node.input[0]])
            weights[node.output[0]] = _random_weight(rng, shape, node.output[0], consumers)
        else:
            nodes.append(node)
    final = next(node for node in nodes if graph.output[0].name in node.output)
    found = _classifier(graph)
    if final.op_type != "Softmax" or found is None:
        data = _small_model(template, nodes, weights, set()) + _weight_chunks(weights, set())
        return data, session(data)
    last, bias = found
    big = _weight_chunks(weights, {last, bias})
    factor = np.float32(1.0 / input_scale)
    for _ in range(8):
        weights[last], weights[bias] = weights[last] * factor, weights[bias] * factor
        data = _small_model(template, nodes, weights, {last, bias}) + big
        runner = session(data)
        x = rng.standard_normal(runner.get_inputs()[0].shape) * input_scale
        probabilities = runner.run(None, {runner.get_inputs()[0].name: x.astype(np.float32)})[0]
        with np.errstate(divide="ignore"):
            logits = np.log(probabilities)  # up to a constant per sample
        if not np.isfinite(logits).all():  # some probability underflowed: far too saturated to measure
            factor = np.float32(1e-3)
            continue
        spread = float(np.std(logits.reshape(len(logits), -1), axis=1).mean())
        if 1.0 <= spread <= 10.0:
            return data, runner
        factor = np.float32(3.0 / spread)
    raise AssertionError(f"{name}: no classifier scale tried gives a useful softmax")
