"""Whether a graph keeps its samples apart, so that requests may share a batch.

Model files declare batch 1 and some bake it into a Reshape target. Running such a graph on
N > 1 samples is only right if no operation mixes samples. The proof is by propagation from a
trial run at the declared batch: the input's axis 0 is the batch axis; each operation either
keeps the batch on axis 0 of its output (convolution, pooling, LRN, elementwise with constants
that broadcast over axis 0, softmax/concat/flatten on later axes, ...) or is not proven to, and
then the graph runs one sample at a time. A Reshape whose target's first dim is the traced
batch size, with the per-sample size unchanged, is rewritten to copy the batch dim (0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from . import ir

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class BatchPlan:
    """The nodes to run (Reshapes rewritten) and, if samples must run alone, why."""

    nodes: list[ir.Node]
    per_sample_reason: str | None


def plan(nodes: list[ir.Node], input_value: str, shapes: Shapes, constants: set[str]) -> BatchPlan:
    batched = {input_value}
    batch = shapes[input_value][0]
    planned: list[ir.Node] = []
    reason: str | None = None
    for node in nodes:
        node, why = _rule(node, batched, constants, shapes, batch)
        planned.append(node)
        if why is None:
            batched.update(node.outputs[:1])
        elif reason is None:
            reason = f"node '{node.name}' ({node.source}) {why}"
    return BatchPlan(planned, reason)


def _rule(
    node: ir.Node, batched: set[str], constants: set[str], shapes: Shapes, batch: int
) -> tuple[ir.Node, str | None]:
    op = node.op
    present = [name for name in node.inputs if name]
    dynamic = [name for name in present if name not in constants]
    if any(name not in batched for name in dynamic):
        return node, "reads a value whose batch axis is unknown"
    if not dynamic:
        return node, "computes from constants only"
    out = shapes.get(node.outputs[0], ())
    first = dynamic[0]
    rank = len(shapes[first])

    def broadcast_safe(names: list[str]) -> bool:
        """Constant operands must not span axis 0 of the output."""
        for name in names:
            if name in constants:
                shape = shapes[name]
                if len(shape) == len(out) and shape and shape[0] != 1:
                    return False
        return True

    if isinstance(op, (ir.Conv, ir.Pool, ir.LRN, ir.Activation, ir.Clip, ir.BatchNorm)):
        return node, None if node.inputs[0] == first else "takes its batch from a constant"
    if isinstance(op, ir.Gemm):
        if op.trans_a or node.inputs[0] != first or any(n in batched for n in present[1:]):
            return node, "multiplies across the batch axis"
        return node, None if broadcast_safe(present[2:]) else "adds a bias spanning the batch axis"
    if isinstance(op, ir.MatMul):
        if node.inputs[0] != first or present[1] in batched or rank < 2:
            return node, "multiplies across the batch axis"
        return node, None
    if isinstance(op, ir.InnerProduct):
        return node, None if op.axis % rank >= 1 else "flattens the batch axis"
    if isinstance(op, ir.Binary):
        b = node.inputs[1]
        spans_batch = b in constants and shapes[b][0:1] not in ((), (1,))
        if op.legacy_axis is not None and op.legacy_axis % rank == 0 and spans_batch:
            return node, "broadcasts a constant along the batch axis"
        return node, None if broadcast_safe(present) else "broadcasts a constant along the batch axis"
    if isinstance(op, ir.Variadic):
        return node, None if broadcast_safe(present) else "broadcasts a constant along the batch axis"
    if isinstance(op, ir.Softmax):
        return node, None if op.axis % rank != 0 else "normalizes over the batch axis"
    if isinstance(op, ir.Concat):
        if len(dynamic) != len(present):
            return node, "concatenates a constant"
        return node, None if op.axis % rank != 0 else "concatenates along the batch axis"
    if isinstance(op, ir.Flatten):
        axis = op.axis + rank if op.axis < 0 else op.axis
        return node, None if axis >= 1 else "flattens the batch axis"
    if isinstance(op, ir.Reshape):
        return _reshape(node, op, shapes[first], batch)
    if isinstance(op, ir.Transpose):
        perm = op.perm if op.perm is not None else tuple(reversed(range(rank)))
        return node, None if perm[0] == 0 else "moves the batch axis"
    if isinstance(op, ir.Squeeze):
        if op.axes is None:
            return node, "squeezes every size-1 dim, the batch axis included"
        return node, None if all(a % rank != 0 for a in op.axes) else "squeezes the batch axis"
    if isinstance(op, ir.Unsqueeze):
        return node, None if all(a % (rank + len(op.axes)) != 0 for a in op.axes) else "inserts a dim before the batch"
    return node, "is not known to keep samples apart"


def _reshape(node: ir.Node, op: ir.Reshape, shape: tuple[int, ...], batch: int) -> tuple[ir.Node, str | None]:
    target = op.shape
    if not target:
        return node, "reshapes to a scalar"
    per_sample = math.prod(shape[1:])
    rest = target[1:]
    if target[0] == 0 and not op.allowzero:
        return node, None
    known_rest = all(d > 0 for d in rest) and math.prod(rest) == per_sample
    if target[0] == -1 and known_rest:
        return node, None
    inferred_rest = sum(1 for d in rest if d == -1) == 1 and all(d != 0 for d in rest)
    if target[0] == batch and (known_rest or (inferred_rest and per_sample % math.prod(d for d in rest if d > 0) == 0)):
        return replace(node, op=replace(op, shape=(0, *rest), allowzero=False)), None
    return node, f"reshapes to {list(target)}, which does not keep the batch dim"
