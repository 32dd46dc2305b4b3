"""The one model representation both importers produce: a graph of format-neutral operations.

A Caffe net and an ONNX graph become the same ``Graph``: nodes in execution order, each an
operation with its parameters (frozen dataclasses below), reading and writing named values.
Values are assigned once (an importer renames Caffe's in-place tops), weights are named
constants, and every operation means exactly one thing, whichever file it came from: the
importers translate each format's conventions (Caffe's pooling rounding, ONNX's even LRN
window, legacy broadcasting) into these parameters. ``runtime`` runs a graph with torch,
``importers.export_onnx`` writes one as ONNX. No torch here: an importer can be read and
tested without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Pads = tuple[int, int, int, int]  # top, left, bottom, right (ONNX's begin..., end... for 2-D)
AutoPad = Literal["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]


@dataclass(frozen=True)
class Conv:
    """inputs: x [N, C, H, W], weight [out, C / group, kh, kw], optional bias [out]."""

    stride: tuple[int, int] = (1, 1)
    pads: Pads = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    group: int = 1
    auto_pad: AutoPad = "NOTSET"


@dataclass(frozen=True)
class Pool:
    """2-D max or average pooling over x [N, C, H, W].

    Output size per axis: ``(H + pad_begin + pad_end - kernel) / stride + 1``, rounded down, or
    up with ``ceil``; with ``ceil`` and ``clip_last_window``, a last window that would start at
    or beyond ``H + pad_begin`` (in the end padding) is dropped (Caffe applies the rule only
    when padded, PyTorch and onnxruntime always). Max never takes a padded value. Average sums
    the in-image values and divides by the window clipped to the padded extent
    ``[-pad_begin, H + pad_end)`` when ``count_include_pad``, else by its in-image part.
    ``global_pool``: the kernel is the input's whole spatial extent.
    """

    method: Literal["max", "avg"]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: Pads = (0, 0, 0, 0)
    ceil: bool = False
    clip_last_window: bool = True
    count_include_pad: bool = False
    global_pool: bool = False
    auto_pad: AutoPad = "NOTSET"


@dataclass(frozen=True)
class LRN:
    """Local response normalization over x [N, C, H, W] (docs/lrn.md).

    ``extra_neighbour``: for an even ``size``, the side of the centre that gets the extra
    neighbour: "before" is PyTorch's window ``[c - n/2, c + n/2 - 1]``, "after" is ONNX's
    ``[c - n/2 + 1, c + n/2]``. Odd sizes are centred either way. Importers give Caffe's
    WITHIN_CHANNEL ``k = 1`` (Caffe ignores the file's k there).
    """

    size: int
    alpha: float
    beta: float
    k: float
    region: Literal["across", "within"] = "across"
    extra_neighbour: Literal["before", "after"] = "before"


@dataclass(frozen=True)
class Gemm:
    """ONNX Gemm: ``alpha * A' @ B' + beta * C`` (A', B' transposed as asked); inputs a, b, optional c."""

    alpha: float = 1.0
    beta: float = 1.0
    trans_a: bool = False
    trans_b: bool = False


@dataclass(frozen=True)
class InnerProduct:
    """Caffe InnerProduct: x flattened from ``axis`` times the weight; inputs x, weight, optional bias.

    weight is [out, in], or [in, out] with ``transpose``; the output keeps x's dims before ``axis``.
    """

    axis: int = 1
    transpose: bool = False


@dataclass(frozen=True)
class MatMul:
    """numpy matmul semantics; inputs a, b."""


@dataclass(frozen=True)
class Binary:
    """Elementwise a (op) b with numpy broadcasting, or with ONNX's pre-opset-7 ``broadcast=1``
    rule when ``legacy_axis`` is set: b's dims align with a's starting at that axis."""

    op: Literal["add", "sub", "mul", "div", "pow", "max", "min"]
    legacy_axis: int | None = None


@dataclass(frozen=True)
class Variadic:
    """Elementwise over any number of inputs with broadcasting; ``coefficients`` scale each
    input of a sum (Caffe's Eltwise SUM coeff)."""

    op: Literal["sum", "prod", "max", "min"]
    coefficients: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Activation:
    """Elementwise ``relu`` (``negative_slope`` makes it leaky), ``sigmoid``, ``tanh`` or ``identity``."""

    op: Literal["relu", "sigmoid", "tanh", "identity"]
    negative_slope: float = 0.0


@dataclass(frozen=True)
class Clip:
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Softmax:
    """Softmax along ``axis``; ``coerce_2d`` (ONNX before opset 13): over all dims from ``axis`` on."""

    axis: int = 1
    coerce_2d: bool = False


@dataclass(frozen=True)
class Concat:
    axis: int = 1


@dataclass(frozen=True)
class Flatten:
    """ONNX (``end_axis`` None): to 2-D, ``[prod(dims[:axis]), prod(dims[axis:])]``.
    Caffe: dims ``axis`` to ``end_axis`` (inclusive, negative from the end) merged into one."""

    axis: int = 1
    end_axis: int | None = None


@dataclass(frozen=True)
class Reshape:
    """ONNX Reshape with a constant target: 0 copies the input's dim (unless ``allowzero``), one
    -1 is inferred."""

    shape: tuple[int, ...]
    allowzero: bool = False


@dataclass(frozen=True)
class Transpose:
    perm: tuple[int, ...] | None = None  # None: reverse the dims


@dataclass(frozen=True)
class Squeeze:
    axes: tuple[int, ...] | None = None  # None: every dim of size 1


@dataclass(frozen=True)
class Unsqueeze:
    axes: tuple[int, ...]  # positions in the output


@dataclass(frozen=True)
class BatchNorm:
    """Inference batch normalization over axis 1; inputs x, scale, bias, mean, variance."""

    epsilon: float = 1e-5


@dataclass(frozen=True)
class ConstantOfShape:
    """A tensor of ``value`` with the (constant) shape given as its input; folded at load."""

    value: float = 0.0
    dtype: str = "float32"


@dataclass(frozen=True)
class Unsupported:
    """A layer or node lrnserve cannot run; kept so ``inspect`` can list it. Building fails."""

    reason: str


Op = (
    Conv
    | Pool
    | LRN
    | Gemm
    | InnerProduct
    | MatMul
    | Binary
    | Variadic
    | Activation
    | Clip
    | Softmax
    | Concat
    | Flatten
    | Reshape
    | Transpose
    | Squeeze
    | Unsqueeze
    | BatchNorm
    | ConstantOfShape
    | Unsupported
)


@dataclass(frozen=True)
class Node:
    """One operation. ``name`` and ``source`` (the file's own type, e.g. "Pooling" or
    "MaxPool@9" for an ONNX op at opset 9) are what error messages and ``inspect`` show;
    ``details`` holds file parameters worth showing that ``op`` does not keep (e.g. a k that
    Caffe ignores)."""

    name: str
    source: str
    op: Op
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Tensor:
    """A graph input or output: the file's name, the value it is, its declared shape (None: unknown)."""

    name: str
    value: str
    shape: tuple[int | None, ...] | None = None


@dataclass
class Graph:
    """A whole model: one input, one output (the classic CNNs), nodes in execution order.

    ``constants`` holds weights and every other value known before any request (float32, or
    int64 for shapes). ``format``: "caffe" or "onnx"; ``origin``: the file(s), for messages.
    """

    name: str
    format: str
    origin: str
    input: Tensor
    output: Tensor
    nodes: list[Node]
    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def unsupported(self) -> Iterator[Node]:
        return (node for node in self.nodes if isinstance(node.op, Unsupported))

    def parameter_count(self) -> int:
        return int(sum(array.size for array in self.constants.values() if array.dtype.kind == "f"))


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for one-line load errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ModelLoadError(ValueError):
    """A model file that cannot be served. The message is one line naming the file and the
    layer or node, fit to be the server's only output before it exits."""
