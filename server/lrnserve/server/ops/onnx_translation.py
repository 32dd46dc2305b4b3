"""``torch.onnx.export`` of networks that use ``torch.ops.lrnserve.local_response_norm``.

torch 2.13's default exporter (``dynamo=True``) translates each op of the exported program
through a table; ``translation_table()`` adds lrnserve's op to it, written with onnxscript
(which the exporter needs anyway): ONNX ``LRN`` where it means the same (across channels,
odd size; ``bias = k``), otherwise the definition in standard ops, ``x / (k + alpha *
mean of x^2 over the window)^beta``, the mean over the full window (zeros outside), which
``AveragePool`` with ``count_include_pad=1`` computes (within channel: a ``size x size`` pool;
across channels with an even size: a ``(size, 1, 1)`` pool over [N, 1, C, H, W]; PyTorch's
window, one more neighbour before than after); float16 and bfloat16 inputs are cast to float32
around it. ``export`` (``lrnserve.server.ops.onnx_export``) is ``torch.onnx.export`` with it.

The deprecated TorchScript exporter (``dynamo=False``, which traces with torch.jit.trace) gets
the same nodes through ``torch.onnx.register_custom_op_symbolic`` (``export(..., dynamo=False)``
registers it; opset 15 or later).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from . import torch_op  # registers the op; OP_NAME for the TorchScript symbolic

OPSET = 18


Emit = Callable[..., Any]  # emit(op_type, *inputs, **attributes) -> the output value


_FLOAT, _FLOAT16, _BFLOAT16 = 1, 10, 16  # onnx.TensorProto data types


def _build(emit: Emit, x: Any, size: int, alpha: float, beta: float, k: float, mode: str, half: bool = False) -> Any:
    """The LRN of ``x`` in ONNX ops, for either exporter (``emit`` makes one node); ``half``
    (float16/bfloat16 x) computes in float32 and rounds back, as lrnserve does."""
    if half:
        wide = _build(emit, emit("Cast", x, to=_FLOAT), size, alpha, beta, k, mode)
        return emit("CastLike", wide, x)
    if mode == "across" and size % 2 == 1:
        return emit("LRN", x, size=size, alpha=alpha, beta=beta, bias=k)
    before, after = size // 2, (size - 1) // 2
    square = emit("Mul", x, x)
    if mode == "across":
        axes = emit("Constant", value_ints=[1])
        lifted = emit("Unsqueeze", square, axes)
        pads = [before, 0, 0, after, 0, 0]
        pooled = emit("AveragePool", lifted, kernel_shape=[size, 1, 1], pads=pads, count_include_pad=1)
        mean = emit("Squeeze", pooled, axes)
    else:
        pads = [before, before, after, after]
        mean = emit("AveragePool", square, kernel_shape=[size, size], pads=pads, count_include_pad=1)

    def scalar(value: float) -> Any:
        return emit("CastLike", emit("Constant", value_float=value), x)

    denominator = emit("Pow", emit("Add", emit("Mul", mean, scalar(alpha)), scalar(k)), scalar(beta))
    return emit("Div", x, denominator)


def _lrn_onnx(x: Any, size: int, alpha: float, beta: float, k: float, mode: str) -> Any:
    """The dynamo exporter's translation, traced through onnxscript's opset 18."""
    from onnxscript import opset18

    def emit(op_type: str, *inputs: Any, **attributes: Any) -> Any:
        return getattr(opset18, op_type)(*inputs, **attributes)

    half = int(getattr(x, "dtype", 0) or 0) in (_FLOAT16, _BFLOAT16)  # onnx_ir.DataType is an IntEnum
    return _build(emit, x, size, alpha, beta, k, mode, half)


def _lrn_torchscript(g: Any, x: Any, size: Any, alpha: Any, beta: Any, k: Any, mode: Any) -> Any:
    """The TorchScript exporter's symbolic (``dynamo=False``); opset 15 or later (CastLike)."""
    from torch.onnx import symbolic_helper

    def emit(op_type: str, *inputs: Any, **attributes: Any) -> Any:
        if op_type == "Constant" and "value_ints" in attributes:
            return g.op("Constant", value_t=torch.tensor(attributes["value_ints"], dtype=torch.int64))
        if op_type == "Constant":
            return g.op("Constant", value_t=torch.tensor(attributes["value_float"], dtype=torch.float32))
        suffixed = {f"{name}_{'f' if isinstance(v, float) else 'i'}": v for name, v in attributes.items()}
        return g.op(op_type, *inputs, **suffixed)

    value: Any = symbolic_helper._get_const  # untyped in torch's stubs
    return _build(
        emit,
        x,
        int(value(size, "i", "size")),
        float(value(alpha, "f", "alpha")),
        float(value(beta, "f", "beta")),
        float(value(k, "f", "k")),
        str(value(mode, "s", "mode")),
        x.type().scalarType() in ("Half", "BFloat16"),
    )


_TORCHSCRIPT_OPSET = 15
_registered_torchscript = False


def register_torchscript_symbolic() -> None:
    """Teach the legacy exporter (``torch.onnx.export(..., dynamo=False)``) the op; idempotent."""
    global _registered_torchscript
    if not _registered_torchscript:
        register: Any = torch.onnx.register_custom_op_symbolic  # type: ignore[attr-defined]
        register(torch_op.OP_NAME, _lrn_torchscript, _TORCHSCRIPT_OPSET)
        _registered_torchscript = True


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``custom_translation_table`` entries for ``torch.onnx.export(..., dynamo=True)``."""
    return {torch.ops.lrnserve.local_response_norm.default: _lrn_onnx}


def export(
    model: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple[Any, ...],
    f: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> torch.onnx.ONNXProgram | None:
    """``torch.onnx.export`` with lrnserve's op translated, opset 18 unless given.

    The default (``dynamo=True``) merges extra ``custom_translation_table`` entries and returns
    the ``ONNXProgram`` (``.model_proto``, ``.save(path)``), written to ``f`` if given.
    ``dynamo=False`` (the deprecated TorchScript exporter) registers the op's symbolic first
    and writes ``f``, returning None."""
    kwargs.setdefault("opset_version", OPSET)
    if not kwargs.pop("dynamo", True):
        register_torchscript_symbolic()
        torch.onnx.export(model, args, f, dynamo=False, **kwargs)
        return None
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
