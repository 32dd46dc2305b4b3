"""ONNX model files into the format-neutral graph (``models.ir``).

Parsed with lrnserve's own subset of onnx.proto (``pb.onnx_pb2``), not the onnx package, so a
server needs neither onnx nor its C++ runtime. The importer checks what a served model relies
on: one data input and one output, every value defined before it is read, tensors whose data
match their shapes; constants (initializers, Constant nodes, ConstantOfShape of a constant
shape) are arrays (float32, or int64 for integer tensors). Operators are translated in
``onnx_ops``; one lrnserve cannot run becomes an ``ir.Unsupported`` node. Every failure is an
``ir.ModelLoadError`` whose one line names the file and, where there is one, the node.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from ..models import ir
from . import onnx_ops
from .pb import onnx_pb2

DataType = onnx_pb2.TensorProto.DataType
OPSETS = range(3, 22)  # the default domain's opsets lrnserve translates
_DEFAULT_DOMAINS = ("", "ai.onnx")

# Element type -> (numpy type of the stored values, the TensorProto field holding typed data).
_TYPES: dict[int, tuple[type[np.generic], str]] = {
    DataType.FLOAT: (np.float32, "float_data"),
    DataType.DOUBLE: (np.float64, "double_data"),
    DataType.FLOAT16: (np.float16, "int32_data"),
    DataType.BFLOAT16: (np.uint16, "int32_data"),
    DataType.INT8: (np.int8, "int32_data"),
    DataType.UINT8: (np.uint8, "int32_data"),
    DataType.INT16: (np.int16, "int32_data"),
    DataType.UINT16: (np.uint16, "int32_data"),
    DataType.INT32: (np.int32, "int32_data"),
    DataType.INT64: (np.int64, "int64_data"),
    DataType.UINT32: (np.uint32, "uint64_data"),
    DataType.UINT64: (np.uint64, "uint64_data"),
    DataType.BOOL: (np.bool_, "int32_data"),
}
_FLOAT_INPUTS = (DataType.UNDEFINED, DataType.FLOAT, DataType.DOUBLE, DataType.FLOAT16, DataType.BFLOAT16)


def _type_name(data_type: int) -> str:
    try:
        return DataType.Name(data_type)  # type: ignore[arg-type]
    except ValueError:
        return f"type {data_type}"


def tensor_to_array(tensor: onnx_pb2.TensorProto, what: str) -> np.ndarray:
    """A TensorProto's values: float types as float32, integer and bool types as int64.

    Raw float32 data is not copied again: the array is a read-only view of the tensor's bytes.
    ``what`` starts the error message (the file and the tensor's owner)."""
    if tensor.data_location == onnx_pb2.TensorProto.EXTERNAL or len(tensor.external_data):
        raise ir.ModelLoadError(
            f"{what}: tensor {tensor.name!r} keeps its data in an external file; "
            "lrnserve reads self-contained .onnx files (save the model with its data inside)"
        )
    if tensor.data_type not in _TYPES:
        raise ir.ModelLoadError(f"{what}: tensor {tensor.name!r} has element type {_type_name(tensor.data_type)}")
    stored, field = _TYPES[tensor.data_type]
    dims = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in dims):
        raise ir.ModelLoadError(f"{what}: tensor {tensor.name!r} has a negative dim in {list(dims)}")
    size = math.prod(dims)
    if tensor.HasField("raw_data"):
        raw = tensor.raw_data
        itemsize = np.dtype(stored).itemsize
        if len(raw) != size * itemsize:
            raise ir.ModelLoadError(
                f"{what}: tensor {tensor.name!r} of shape {list(dims)} needs {size * itemsize} bytes, has {len(raw)}"
            )
        values = np.frombuffer(raw, dtype=np.dtype(stored).newbyteorder("<"))
    else:
        typed = getattr(tensor, field)
        if len(typed) != size:
            raise ir.ModelLoadError(
                f"{what}: tensor {tensor.name!r} of shape {list(dims)} has {len(typed)} values in {field}, not {size}"
            )
        if field == "int32_data" and stored in (np.float16, np.uint16):  # the bit patterns, one per int32
            values = np.asarray(typed, dtype=np.int64).astype(np.uint16).view(stored)
        else:
            values = np.asarray(typed).astype(stored)
    if tensor.data_type == DataType.BFLOAT16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    target = np.float32 if values.dtype.kind == "f" else np.int64
    return values.astype(target, copy=False).reshape(dims)


Attribute = onnx_pb2.AttributeProto

_TYPE_NAMES: dict[int, str] = {int(value): name for name, value in Attribute.AttributeType.items()}


def _present_type(attribute: Attribute) -> int:
    """The type of an attribute without ``type`` (IR version 1 files): the field that is set."""
    for field, kind in (("f", Attribute.FLOAT), ("i", Attribute.INT), ("s", Attribute.STRING), ("t", Attribute.TENSOR)):
        if attribute.HasField(field):  # type: ignore[arg-type]
            return kind
    if attribute.HasField("g"):
        return Attribute.GRAPH
    for field, kind in (("floats", Attribute.FLOATS), ("ints", Attribute.INTS), ("strings", Attribute.STRINGS)):
        if len(getattr(attribute, field)):
            return kind
    return Attribute.UNDEFINED


class OpNode:
    """One NodeProto as its translation reads it: typed attributes with defaults, its inputs
    (empty name: absent), which outputs the graph uses, and the constants known so far."""

    def __init__(
        self,
        proto: onnx_pb2.NodeProto,
        name: str,
        opset: int,
        where: str,
        constants: dict[str, np.ndarray],
        consumed: set[str],
    ) -> None:
        self.proto, self.name, self.opset, self.where = proto, name, opset, where
        self.op_type = proto.op_type
        self.inputs: tuple[str, ...] = tuple(proto.input)
        self.outputs: tuple[str, ...] = tuple(proto.output)
        self.details: list[tuple[str, str]] = []
        self._constants, self._consumed = constants, consumed
        self._attributes: dict[str, Attribute] = {}
        for attribute in proto.attribute:
            if attribute.name in self._attributes:
                raise self.error(f"attribute {attribute.name!r} is given twice")
            if attribute.ref_attr_name:
                raise self.error(f"attribute {attribute.name!r} refers to a function attribute outside a function")
            self._attributes[attribute.name] = attribute

    def error(self, message: str) -> ir.ModelLoadError:
        return ir.ModelLoadError(f"{self.where}: {message}")

    # --- attributes ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._attributes

    def _get(self, name: str, kind: int) -> Attribute | None:
        attribute = self._attributes.get(name)
        if attribute is None:
            return None
        found = attribute.type or _present_type(attribute)
        if found != kind:
            raise self.error(
                f"attribute {name!r} must be {_TYPE_NAMES[kind]}, not {_TYPE_NAMES.get(found, f'type {found}')}"
            )
        return attribute

    def attr_int(self, name: str, default: int) -> int:
        attribute = self._get(name, Attribute.INT)
        return default if attribute is None else int(attribute.i)

    def attr_float(self, name: str, default: float) -> float:
        attribute = self._get(name, Attribute.FLOAT)
        return default if attribute is None else float(attribute.f)

    def attr_ints(self, name: str) -> tuple[int, ...] | None:
        attribute = self._get(name, Attribute.INTS)
        return None if attribute is None else tuple(int(v) for v in attribute.ints)

    def attr_floats(self, name: str) -> tuple[float, ...] | None:
        attribute = self._get(name, Attribute.FLOATS)
        return None if attribute is None else tuple(float(v) for v in attribute.floats)

    def attr_string(self, name: str, default: str) -> str:
        attribute = self._get(name, Attribute.STRING)
        if attribute is None:
            return default
        try:
            return attribute.s.decode()
        except UnicodeDecodeError:
            raise self.error(f"attribute {name!r} is not UTF-8 text") from None

    def attr_tensor(self, name: str) -> np.ndarray | None:
        attribute = self._get(name, Attribute.TENSOR)
        return None if attribute is None else tensor_to_array(attribute.t, f"{self.where}: attribute {name!r}")

    def flag(self, name: str, default: bool = False) -> bool:
        return self.attr_int(name, int(default)) != 0

    # --- inputs and outputs -------------------------------------------------------------
    def input(self, index: int) -> str:
        """The input's name, "" when absent (past the end or given as an empty name)."""
        return self.inputs[index] if index < len(self.inputs) else ""

    def require(self, count: int) -> None:
        missing = [i for i in range(count) if not self.input(i)]
        if missing:
            raise self.error(f"needs {count} input{'s' if count > 1 else ''}, input {missing[0]} is missing")

    def constant(self, index: int) -> np.ndarray | None:
        return self._constants.get(self.input(index)) if self.input(index) else None

    def constant_input(self, index: int, what: str) -> np.ndarray | None:
        """An optional input that lrnserve needs at load: None when absent, else its value."""
        if not self.input(index):
            return None
        value = self.constant(index)
        if value is None:
            raise onnx_ops.NotRunnable(
                f"{self.op_type}@{self.opset}: {what} ({self.input(index)!r}) must be a constant"
            )
        return value

    def keep(self, *indices: int, required: int = 1) -> None:
        """Keep only these inputs (the data the ir op reads), the first ``required`` of them
        present, dropping absent trailing ones."""
        self.require(required)
        kept = [self.input(i) for i in indices]
        while kept and not kept[-1]:
            kept.pop()
        if "" in kept:
            raise self.error(f"input {kept.index('')} is missing")
        self.inputs = tuple(kept)

    def used(self, index: int) -> bool:
        return index < len(self.outputs) and self.outputs[index] in self._consumed

    def only_first_output(self, what: str) -> None:
        """Drop the optional outputs inference never computes; a graph that reads one is refused."""
        for index in range(1, len(self.outputs)):
            if self.used(index):
                raise onnx_ops.NotRunnable(
                    f"{self.op_type}@{self.opset}: output {self.outputs[index]!r} ({what}) is used"
                )
        self.outputs = self.outputs[:1]


def read_model(path: Path) -> ir.Graph:
    """Read and translate an .onnx file; every failure is a one-line ModelLoadError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ir.ModelLoadError(f"{path}: no such file") from None
    except OSError as error:
        raise ir.ModelLoadError(f"{path}: cannot read the file ({error.strerror or error})") from None
    return parse_model(data, str(path))


def parse_model(data: bytes, origin: str) -> ir.Graph:
    """Translate the bytes of an .onnx file; ``origin`` names it in messages."""
    model = onnx_pb2.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:  # upb reports some depth limits as RuntimeError
        raise ir.ModelLoadError(f"{origin}: not an ONNX model (cannot decode it as a ModelProto: {error})") from None
    if not model.HasField("graph"):
        raise ir.ModelLoadError(f"{origin}: not an ONNX model (no graph; is the file truncated or another format?)")
    for what, text in _names(model):
        if not isinstance(text, str):  # upb hands out proto2 strings that are not UTF-8 as bytes
            raise ir.ModelLoadError(f"{origin}: not an ONNX model ({what} {text!r} is not UTF-8 text)")
    return _Importer(model, origin).graph()


def _names(model: onnx_pb2.ModelProto) -> Iterator[tuple[str, object]]:
    graph = model.graph
    yield "the graph name", graph.name
    for entry in model.opset_import:
        yield "an opset domain", entry.domain
    for kind, values in (("input", graph.input), ("output", graph.output), ("initializer", graph.initializer)):
        for value in values:
            yield f"a graph {kind} name", value.name
    for index, node in enumerate(graph.node):
        for text in (node.name, node.op_type, node.domain, *node.input, *node.output):
            yield f"a name in node {index}", text
        for attribute in node.attribute:
            yield f"an attribute name in node {index}", attribute.name


class _Importer:
    """One model's translation: the state shared while its nodes are read in order."""

    def __init__(self, model: onnx_pb2.ModelProto, origin: str) -> None:
        self.model, self.origin, self.proto = model, origin, model.graph
        self.opsets = self._opsets()
        self.constants: dict[str, np.ndarray] = {}
        self.defined: set[str] = set()

    def fail(self, message: str) -> ir.ModelLoadError:
        return ir.ModelLoadError(f"{self.origin}: {message}")

    def _opsets(self) -> dict[str, int]:
        if not len(self.model.opset_import):
            raise self.fail("no opset_import (not an ONNX model, or one too old to say which operators it uses)")
        opsets: dict[str, int] = {}
        for entry in self.model.opset_import:
            domain = "" if entry.domain in _DEFAULT_DOMAINS else entry.domain
            if domain in opsets and opsets[domain] != entry.version:
                raise self.fail(f"opset_import lists domain {entry.domain or 'ai.onnx'!r} twice")
            opsets[domain] = int(entry.version)
        if "" not in opsets:
            raise self.fail("opset_import has no version for the default domain (ai.onnx)")
        return opsets

    def graph(self) -> ir.Graph:
        proto = self.proto
        for tensor in proto.initializer:
            if not tensor.name:
                raise self.fail("an initializer has no name")
            if tensor.name in self.constants:
                raise self.fail(f"initializer {tensor.name!r} is defined twice")
            self.constants[tensor.name] = tensor_to_array(tensor, f"{self.origin}: initializer {tensor.name!r}")
        self.defined.update(self.constants)
        graph_input = self._input()
        self.defined.add(graph_input.value)
        graph_output = self._output()
        consumed = {name for node in proto.node for name in node.input if name} | {graph_output.value}
        translated = [self._node(index, consumed) for index in self._order()]
        nodes = [node for node in translated if node is not None]
        if graph_output.value not in self.defined:
            raise self.fail(f"graph output {graph_output.name!r} is not computed by any node")
        used = {name for node in nodes for name in node.inputs} | {graph_output.value}
        constants = {name: value for name, value in self.constants.items() if name in used}
        return ir.Graph(
            name=proto.name or Path(self.origin).stem,
            format="onnx",
            origin=self.origin,
            input=graph_input,
            output=graph_output,
            nodes=nodes,
            constants=constants,
        )

    def _shape(self, value: onnx_pb2.ValueInfoProto) -> tuple[int | None, ...] | None:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            return None
        return tuple(
            int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None
            for dim in value.type.tensor_type.shape.dim
        )

    def _input(self) -> ir.Tensor:
        """The one data input; inputs with an initializer are weights (IR < 4 lists them all),
        and a served model only ever gets its data input, so they keep their stored values."""
        inputs = [value for value in self.proto.input if value.name not in self.constants]
        if len(inputs) != 1:
            names = ", ".join(repr(value.name) for value in inputs) or "none"
            raise self.fail(f"lrnserve serves graphs with exactly one data input, this one has {len(inputs)}: {names}")
        value = inputs[0]
        if not value.name:
            raise self.fail("the graph input has no name")
        element = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else DataType.UNDEFINED
        if element not in _FLOAT_INPUTS:
            raise self.fail(f"graph input {value.name!r} has element type {_type_name(element)}; lrnserve serves float")
        return ir.Tensor(name=value.name, value=value.name, shape=self._shape(value))

    def _output(self) -> ir.Tensor:
        outputs = list(self.proto.output)
        if len(outputs) != 1:
            names = ", ".join(repr(value.name) for value in outputs) or "none"
            raise self.fail(f"lrnserve serves graphs with exactly one output, this one has {len(outputs)}: {names}")
        value = outputs[0]
        if not value.name:
            raise self.fail("the graph output has no name")
        return ir.Tensor(name=value.name, value=value.name, shape=self._shape(value))

    def _label(self, index: int) -> str:
        node = self.proto.node[index]
        return f"node {node.name or _fallback_name(node, index)!r} ({node.op_type or '?'})"

    def _order(self) -> list[int]:
        """Node indices in execution order: the file's order (ONNX asks for a topological one),
        moving a node after the producers of its inputs where a file does not keep it."""
        producer: dict[str, int] = {}
        for index, node in enumerate(self.proto.node):
            for name in node.output:
                if not name:
                    continue
                if name in producer or name in self.defined:
                    raise self.fail(f"{self._label(index)}: output {name!r} is already defined")
                producer[name] = index
        order: list[int] = []
        state: dict[int, int] = {}  # 1: on the stack, 2: placed
        for root in range(len(self.proto.node)):
            stack = [(root, 0)]
            while stack:
                index, position = stack.pop()
                if position == 0:
                    if state.get(index) == 2:
                        continue
                    state[index] = 1
                inputs = self.proto.node[index].input
                while position < len(inputs):
                    name = inputs[position]
                    position += 1
                    if not name or name in self.defined:
                        continue
                    if name not in producer:
                        raise self.fail(f"{self._label(index)}: input {name!r} is not defined anywhere in the graph")
                    before = producer[name]
                    if state.get(before) == 1:
                        raise self.fail(f"{self._label(index)}: input {name!r} depends on the node's own output")
                    if state.get(before) != 2:
                        stack.extend([(index, position), (before, 0)])
                        break
                else:
                    state[index] = 2
                    order.append(index)
        return order

    def _node(self, index: int, consumed: set[str]) -> ir.Node | None:
        proto = self.proto.node[index]
        domain = "" if proto.domain in _DEFAULT_DOMAINS else proto.domain
        opset = self.opsets.get(domain, 0)
        name = proto.name or _fallback_name(proto, index)
        source = f"{proto.op_type}@{opset}" if not domain else f"{domain}.{proto.op_type}@{opset}"
        if not proto.op_type:
            raise self.fail(f"node {name!r} has no op_type")
        if not proto.output or not proto.output[0]:
            raise self.fail(f"node {name!r} ({proto.op_type}) has no (first) output")
        where = f"{self.origin}: node {name!r} ({source})"
        node = OpNode(proto, name, opset, where, self.constants, consumed)
        result: ir.Op | np.ndarray
        if domain:
            reason = f"ONNX op {proto.op_type} of domain {domain!r} is not supported; lrnserve runs the default domain"
            result = ir.Unsupported(reason=f"{reason} ({', '.join(onnx_ops.SUPPORTED_OPS)})")
        elif opset not in OPSETS:
            result = ir.Unsupported(
                reason=f"ONNX op {proto.op_type} at opset {opset}: lrnserve supports opsets 3 to 21"
            )
        else:
            try:
                result = onnx_ops.translate(node)
            except onnx_ops.NotRunnable as why:
                result = ir.Unsupported(reason=str(why))
                node.inputs, node.outputs = tuple(proto.input), tuple(proto.output)
            else:
                if len(node.outputs) > 1:
                    raise node.error(f"has {len(node.outputs)} outputs, the op has one")
        if isinstance(result, np.ndarray):
            self.constants[node.outputs[0]] = result
            self.defined.add(node.outputs[0])
            return None
        self.defined.update(name for name in node.outputs if name)
        return ir.Node(
            name=name,
            source=source,
            op=result,
            inputs=node.inputs,
            outputs=node.outputs,
            details=tuple(node.details),
        )


def _fallback_name(node: onnx_pb2.NodeProto, index: int) -> str:
    return f"{node.op_type or 'node'}_{index}"
