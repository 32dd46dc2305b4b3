"""``lrnserve inspect``: what a model file holds and whether lrnserve can run it, before anyone
starts a server.

The report is written from the ``ir.Graph`` alone (so it works on graphs with nodes lrnserve
cannot run); only when every node is supported does it build the network, for the traced
shapes and the batching decision, and a build failure becomes one line of the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..models import ir
from ..models.runtime import GraphNetwork


@dataclass(frozen=True)
class Report:
    """The text, and the verdict ``inspect`` turns into its exit code."""

    text: str
    runnable: bool
    network: GraphNetwork | None


def describe(graph: ir.Graph) -> str:
    return report(graph).text


def _shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _pair(values: tuple[int, int]) -> str:
    return f"{values[0]}x{values[1]}"


def _pads(pads: ir.Pads) -> str:
    top, left, bottom, right = pads
    if top == bottom and left == right:
        return _pair((top, left))
    return f"{top},{left},{bottom},{right} (top,left,bottom,right)"


def _rounding(op: ir.Pool) -> str:
    if not op.ceil:
        return "floor"
    if op.clip_last_window:
        return "ceil (a last window that would start in the end padding is dropped)"
    return "ceil (no window dropped)"


def _pool(op: ir.Pool) -> list[str]:
    parts: list[str] = [op.method]
    if op.global_pool:
        parts.append("global (kernel = input size)")
    else:
        parts += [f"kernel {_pair(op.kernel)}", f"stride {_pair(op.stride)}"]
        parts.append(f"auto_pad {op.auto_pad}" if op.auto_pad != "NOTSET" else f"pad {_pads(op.pads)}")
        parts.append(f"rounding {_rounding(op)}")
    if op.method == "avg":
        parts.append("divisor: window within the padded input" if op.count_include_pad else "divisor: in-image values")
    return parts


def _lrn(op: ir.LRN) -> list[str]:
    parts = [
        "across channels" if op.region == "across" else "within channel",
        f"size {op.size}",
        f"alpha {op.alpha:g}",
        f"beta {op.beta:g}",
        f"k {op.k:g}",
    ]
    if op.size % 2 == 0:
        window = "PyTorch's" if op.extra_neighbour == "before" else "ONNX's"
        parts.append(f"even window: extra neighbour {op.extra_neighbour} the centre ({window})")
    return parts


def _conv(op: ir.Conv, node: ir.Node, graph: ir.Graph) -> list[str]:
    weight = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    parts = []
    if weight is not None and weight.ndim == 4:
        parts += [f"{weight.shape[0]} outputs", f"kernel {weight.shape[2]}x{weight.shape[3]}"]
    parts += [f"stride {_pair(op.stride)}"]
    parts.append(f"auto_pad {op.auto_pad}" if op.auto_pad != "NOTSET" else f"pad {_pads(op.pads)}")
    if op.dilation != (1, 1):
        parts.append(f"dilation {_pair(op.dilation)}")
    parts += [f"group {op.group}", "bias" if len(node.inputs) > 2 and node.inputs[2] else "no bias"]
    return parts


def _inner_product(op: ir.InnerProduct, node: ir.Node, graph: ir.Graph) -> list[str]:
    weight = graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    parts = []
    if weight is not None and weight.ndim == 2:
        parts.append(f"{weight.shape[1] if op.transpose else weight.shape[0]} outputs")
    parts += [f"axis {op.axis}", *(["transposed weight"] if op.transpose else [])]
    parts.append("bias" if len(node.inputs) > 2 and node.inputs[2] else "no bias")
    return parts


def _generic(op: ir.Op) -> list[str]:
    """The op's fields that are set, for the operations whose parameters read plainly."""
    values = [(field.name, getattr(op, field.name)) for field in dataclasses.fields(op)]
    parts = [f"{name} {value}" for name, value in values if value is not None and value is not False]
    return parts or ["-"]


def parameters(node: ir.Node, graph: ir.Graph) -> str:
    """The node's key parameters, as ``inspect`` prints them."""
    op = node.op
    if isinstance(op, ir.Pool):
        parts = _pool(op)
    elif isinstance(op, ir.LRN):
        parts = _lrn(op)
    elif isinstance(op, ir.Conv):
        parts = _conv(op, node, graph)
    elif isinstance(op, ir.InnerProduct):
        parts = _inner_product(op, node, graph)
    elif isinstance(op, ir.Activation):
        parts = [str(op.op)] + ([f"negative_slope {op.negative_slope:g}"] if op.negative_slope else [])
    elif isinstance(op, ir.Binary):
        parts = [op.op] + ([f"legacy broadcast from axis {op.legacy_axis}"] if op.legacy_axis is not None else [])
    elif isinstance(op, ir.Variadic):
        parts = [op.op] + ([f"coefficients {list(op.coefficients)}"] if op.coefficients is not None else [])
    elif isinstance(op, ir.Softmax):
        parts = [f"axis {op.axis}"] + (["over all dims from axis on (2-D coercion)"] if op.coerce_2d else [])
    elif isinstance(op, ir.Unsupported):
        parts = [f"NOT SUPPORTED: {op.reason}"]
    else:
        parts = _generic(op)
    parts += [f"{key}: {value}" for key, value in node.details]
    return ", ".join(parts)


def report(graph: ir.Graph, network: GraphNetwork | None = None) -> Report:
    """The report, building the network (unless given) when no node is unsupported."""
    unsupported = list(graph.unsupported())
    error = None
    if network is None and not unsupported:
        try:
            network = GraphNetwork(graph)
        except ir.ModelLoadError as exc:
            error = ir.first_line(exc)
    shapes = network.value_shapes if network is not None else {}
    kind = "layer" if graph.format == "caffe" else "node"
    lines = [f"model {graph.name} ({graph.format}): {graph.origin}"]
    declared = f"declared {_shape(graph.input.shape)}"
    if network is not None:
        lines.append(f"input  {graph.input.name} [N, {_shape(network.input_shape)[1:]} ({declared})")
        lines.append(f"output {graph.output.name} [N, {_shape(network.output_shape)[1:]}")
    else:
        lines.append(f"input  {graph.input.name} {declared}")
        lines.append(f"output {graph.output.name} {_shape(graph.output.shape)}")
    shown_shapes = ", with output shapes from lrnserve's trial run" if shapes else ""
    lines.append(f"{kind}s ({len(graph.nodes)}){shown_shapes}:")
    width = max((len(node.name) for node in graph.nodes), default=0)
    source_width = max((len(node.source) for node in graph.nodes), default=0)
    for node in graph.nodes:
        out = node.outputs[0] if node.outputs else ""
        shown = f" -> {list(shapes[out])}" if out in shapes else ""
        lines.append(f"  {node.name:<{width}}  {node.source:<{source_width}}  {parameters(node, graph)}{shown}")
    lines.append(f"parameters: {graph.parameter_count():,}")
    if unsupported:
        lines.append(f"lrnserve cannot run {len(unsupported)} {kind}(s) of this model:")
        lines += [f"  {node.name} ({node.source}): {node.op.reason}" for node in unsupported]  # type: ignore[union-attr]
    elif error is not None:
        lines.append(f"lrnserve cannot load this model: {error}")
    else:
        assert network is not None
        if network.per_sample:
            lines.append(f"batching: one sample at a time, because {network.per_sample}")
        else:
            lines.append("batching: requests share batches (every node keeps samples apart)")
        lines.append("lrnserve can run this model")
    return Report("\n".join(lines), not unsupported and error is None, network)
