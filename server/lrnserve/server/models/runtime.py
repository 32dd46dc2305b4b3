"""Runs an imported model (``ir.Graph``) with torch: the same kind of network the built-ins are.

Building checks everything a request could otherwise trip over, so a bad file fails at load
with one line: unsupported operations, undefined values, and a trial forward at the declared
batch that names the node whose shapes do not fit. The trial also gives every value's shape,
from which ``batch_axis`` decides whether samples may share a batch. Constants are buffers, so
``.to(device, dtype)`` moves and casts the whole model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import base, batch_axis, graph_ops, ir
from .base import LRNFactory

logger = logging.getLogger(__name__)

TRIAL_SEED = 0


@dataclass(frozen=True)
class _Planned:
    node: ir.Node
    step: graph_ops.Step
    args: tuple[tuple[bool, str], ...]  # (is constant, buffer attribute or value name); "" = absent
    frees: tuple[str, ...]  # values no later node reads


class GraphNetwork(nn.Module):
    """An imported model: one input, one output, nodes run in file order.

    ``per_sample`` (a reason, or None): when the graph is not proven to keep samples apart,
    ``forward`` runs each sample of a batch alone, so requests still batch and stay correct.
    """

    def __init__(self, graph: ir.Graph, lrn_layer: LRNFactory | None = None) -> None:
        super().__init__()
        self.name = graph.name
        self.format = graph.format
        self.origin = graph.origin
        self.input_name = graph.input.name
        self.output_name = graph.output.name
        self.weights_source = graph.origin
        self._lrn_layer = lrn_layer
        self._input_value = graph.input.value
        self._output_value = graph.output.value
        for node in graph.unsupported():
            raise ir.ModelLoadError(f"{self._where(node)}: {node.op.reason}")  # type: ignore[union-attr]
        declared = graph.input.shape
        if declared is None or len(declared) < 2 or any(d is None or d <= 0 for d in declared[1:]):
            raise ir.ModelLoadError(
                f"{self.origin}: input '{self.input_name}' has shape {_show(declared)}; lrnserve needs a known "
                "sample shape (every dim after the batch)"
            )
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in declared[1:] if d is not None)
        constants = {name: torch.from_numpy(array.copy()) for name, array in graph.constants.items()}
        nodes = self._fold(self._checked(graph), constants)
        batch = 1 if graph.format == "caffe" or not declared[0] else int(declared[0])
        shapes = self._trial(nodes, constants, batch)
        out_shape = shapes[self._output_value]
        if not out_shape or out_shape[0] != batch:
            raise ir.ModelLoadError(
                f"{self.origin}: output '{self.output_name}' has shape {list(out_shape)} for a batch of {batch}; "
                "lrnserve serves outputs whose first dim is the batch"
            )
        self.output_shape: tuple[int, ...] = tuple(out_shape[1:])
        self.value_shapes = shapes
        planned = batch_axis.plan(nodes, self._input_value, shapes, set(constants))
        self.per_sample = planned.per_sample_reason
        if self.per_sample and batch > 1:
            # Its samples may depend on each other in groups of the declared batch: no request
            # of another size could be answered as the file defines it.
            raise ir.ModelLoadError(
                f"{self.origin}: the graph declares batch {batch} and {self.per_sample}, so its samples cannot be "
                "served apart; export it with batch 1 or a symbolic batch dim"
            )
        if self.per_sample:
            logger.info("%s: runs one sample at a time: %s", self.name, self.per_sample)
        self._plan = self._build(planned.nodes, constants)

    def _where(self, node: ir.Node) -> str:
        kind = "layer" if self.format == "caffe" else "node"
        return f"{self.origin}: {kind} '{node.name}' ({node.source})"

    def _checked(self, graph: ir.Graph) -> list[ir.Node]:
        defined = {self._input_value, *graph.constants}
        for node in graph.nodes:
            for name in node.inputs:
                if name and name not in defined:
                    raise ir.ModelLoadError(f"{self._where(node)}: reads '{name}', which nothing before it produces")
            defined.update(node.outputs[:1])
        if self._output_value not in defined:
            raise ir.ModelLoadError(f"{self.origin}: output '{self.output_name}' is produced by no node")
        used = {name for node in graph.nodes for name in node.inputs} | {self._output_value}
        for node in graph.nodes:
            extra = [name for name in node.outputs[1:] if name and name in used]
            if extra:
                raise ir.ModelLoadError(
                    f"{self._where(node)}: its output '{extra[0]}' is used, which lrnserve cannot compute"
                )
        return list(graph.nodes)

    def _fold(self, nodes: list[ir.Node], constants: dict[str, torch.Tensor]) -> list[ir.Node]:
        """Nodes computed from constants only are computed once, here."""
        remaining = []
        for node in nodes:
            present = [name for name in node.inputs if name]
            if all(name in constants for name in present):
                args = [constants[name] if name else None for name in node.inputs]
                try:
                    constants[node.outputs[0]] = graph_ops.step_for(node.op, self._lrn_layer)(*args)
                except Exception as exc:
                    raise ir.ModelLoadError(f"{self._where(node)}: {ir.first_line(exc)}") from None
            else:
                remaining.append(node)
        return remaining

    def _trial(
        self, nodes: list[ir.Node], constants: dict[str, torch.Tensor], batch: int
    ) -> dict[str, tuple[int, ...]]:
        generator = torch.Generator().manual_seed(TRIAL_SEED)
        x = torch.randn(batch, *self.input_shape, generator=generator)
        shapes = {name: tuple(value.shape) for name, value in constants.items()}
        values: dict[str, torch.Tensor] = {self._input_value: x}
        shapes[self._input_value] = tuple(x.shape)
        with torch.inference_mode():
            for node in nodes:
                args = [(constants[n] if n in constants else values[n]) if n else None for n in node.inputs]
                try:
                    out = graph_ops.step_for(node.op, self._lrn_layer)(*args)
                except Exception as exc:
                    shown = ", ".join(str(list(a.shape)) for a in args if a is not None)
                    raise ir.ModelLoadError(
                        f"{self._where(node)}: fails on inputs of shape {shown} "
                        f"(declared input {[batch, *self.input_shape]}): {ir.first_line(exc)}"
                    ) from None
                values[node.outputs[0]] = out
                shapes[node.outputs[0]] = tuple(out.shape)
        return shapes

    def _build(self, nodes: list[ir.Node], constants: dict[str, torch.Tensor]) -> list[_Planned]:
        last_use: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for name in node.inputs:
                if name and name not in constants:
                    last_use[name] = index
        attributes: dict[str, str] = {}
        self.steps = nn.ModuleList()
        planned = []
        for index, node in enumerate(nodes):
            args = []
            for name in node.inputs:
                if name in constants:
                    if name not in attributes:
                        attributes[name] = f"constant_{len(attributes)}"
                        self.register_buffer(attributes[name], constants[name].clone())
                    args.append((True, attributes[name]))
                else:
                    args.append((False, name))
            step = graph_ops.step_for(node.op, self._lrn_layer)
            if isinstance(step, nn.Module):
                self.steps.append(step)
            frees = tuple(
                name
                for name in dict.fromkeys(node.inputs)
                if name and name not in constants and last_use.get(name) == index and name != self._output_value
            )
            planned.append(_Planned(node, step, tuple(args), frees))
        return planned

    def chain_nodes(self) -> list[tuple[ir.Node, list[torch.Tensor | None]]] | None:
        """The nodes in order, each with its inputs' constants (None for the value that flows in),
        when every node's first input is the one before it's output (the first node's: the model's
        input), its other inputs are constants or absent, and the last produces the output; else
        None. For ``chain``."""
        nodes: list[tuple[ir.Node, list[torch.Tensor | None]]] = []
        flowing = self._input_value
        for planned in self._plan:
            args = planned.args
            if not args or args[0] != (False, flowing) or any(key and not constant for constant, key in args[1:]):
                return None
            nodes.append((planned.node, [getattr(self, key) if constant else None for constant, key in planned.args]))
            flowing = planned.node.outputs[0]
        return nodes if flowing == self._output_value else None

    def prepack_for_cpu(self) -> int:
        """Conv nodes with constant float32 CPU weights run through oneDNN with their weights
        reordered once, here (``base.PackedConv2d``), InnerProduct and Gemm nodes through
        ``base.CpuLinear``, a ReLU node that alone reads one's output fused into either. Returns
        the nodes prepared."""
        if not base.onednn_packing_available():
            return 0
        reads: dict[str, int] = {}
        for planned in self._plan:
            for constant, key in planned.args:
                if key and not constant:
                    reads[key] = reads.get(key, 0) + 1
        packed = 0
        for index, planned in enumerate(self._plan):
            made = self._packed_step(planned)
            if made is None:
                continue
            module, weight_args = made
            out = planned.node.outputs[0]
            following = self._plan[index + 1] if index + 1 < len(self._plan) else None
            if (
                following is not None
                and isinstance(following.node.op, ir.Activation)
                and following.node.op.op == "relu"
                and not following.node.op.negative_slope
                and following.args == ((False, out),)
                and reads.get(out) == 1
                and out != self._output_value
            ):
                module.attr = "relu"
                self._plan[index + 1] = dataclasses.replace(following, step=_identity)
            self._plan[index] = dataclasses.replace(planned, step=module, args=planned.args[:1])
            self.steps.append(module)
            for _, key in weight_args:
                if hasattr(self, key):  # the reordered copy replaces the constant (unless shared)
                    still_read = any(key == k for p in self._plan for c, k in p.args if c)
                    if not still_read:
                        delattr(self, key)
            packed += 1
        return packed

    def _packed_step(
        self, planned: _Planned
    ) -> tuple[base.PackedConv2d | _PackedFlat, tuple[tuple[bool, str], ...]] | None:
        op, args = planned.node.op, planned.args
        if len(args) < 2 or not all(constant for constant, _ in args[1:]) or args[0][0]:
            return None
        tensors = [getattr(self, key) if key else None for _, key in args[1:]]
        weight, bias = tensors[0], tensors[1] if len(tensors) > 1 else None
        if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            return None
        if isinstance(op, ir.Conv):
            top, left, bottom, right = op.pads
            if op.auto_pad != "NOTSET" or top != bottom or left != right or weight.dim() != 4:
                return None
            conv = nn.Conv2d(
                weight.shape[1] * op.group, weight.shape[0], tuple(weight.shape[2:]), op.stride, (top, left),
                op.dilation, op.group, bias=bias is not None,
            )  # fmt: skip
            with torch.no_grad():
                conv.weight.copy_(weight)
                if bias is not None and conv.bias is not None:
                    conv.bias.copy_(bias)
            shape = self.value_shapes.get(args[0][1])
            input_size = [1, *shape[1:]] if shape is not None and len(shape) == 4 else None
            return base.PackedConv2d(conv, relu=False, input_size=input_size), args[1:]
        if isinstance(op, ir.InnerProduct) and op.axis == 1 and weight.dim() == 2:
            matrix = weight.t() if op.transpose else weight
            return _PackedFlat(_linear(matrix, bias)), args[1:]
        if (
            isinstance(op, ir.Gemm)
            and op.trans_b
            and not op.trans_a
            and op.alpha == 1.0
            and op.beta == 1.0
            and weight.dim() == 2
        ):
            return _PackedFlat(_linear(weight, bias), flatten=False), args[1:]
        return None

    def lrn_layers(self) -> list[tuple[str, nn.Module]]:
        return [(p.node.name, p.step) for p in self._plan if isinstance(p.step, graph_ops.LRNStep)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_until(x, None)
        assert out is not None
        return out

    def forward_until(self, x: torch.Tensor, stop: Callable[[], bool] | None) -> torch.Tensor | None:
        """``forward``, giving up (None) between nodes once ``stop()`` is true."""
        if not self.per_sample or x.shape[0] == 1:
            return self._run(x, stop)
        outputs = []
        for i in range(x.shape[0]):
            out = self._run(x[i : i + 1], stop)
            if out is None:
                return None
            outputs.append(out)
        return torch.cat(outputs)

    def _run(self, x: torch.Tensor, stop: Callable[[], bool] | None) -> torch.Tensor | None:
        values: dict[str, torch.Tensor] = {self._input_value: x}
        for planned in self._plan:
            if stop is not None and stop():
                return None
            args = [
                getattr(self, key) if constant else (values[key] if key else None) for constant, key in planned.args
            ]
            values[planned.node.outputs[0]] = planned.step(*args)
            for name in planned.frees:
                del values[name]
        return values[self._output_value]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> base.CpuLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None and linear.bias is not None:
            linear.bias.copy_(bias)
    return base.CpuLinear(linear, relu=False)


class _PackedFlat(nn.Module):
    """A prepacked InnerProduct (x flattened from axis 1) or Gemm (x already 2-D)."""

    def __init__(self, linear: base.CpuLinear, flatten: bool = True) -> None:
        super().__init__()
        self.linear, self.flatten = linear, flatten

    @property
    def attr(self) -> str:
        return self.linear.attr

    @attr.setter
    def attr(self, value: str) -> None:
        self.linear.attr = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        elif x.dim() != 2:
            raise ValueError(f"Gemm expects a 2-D input, got shape {list(x.shape)}")
        return self.linear(x)  # type: ignore[no-any-return]


def _show(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
