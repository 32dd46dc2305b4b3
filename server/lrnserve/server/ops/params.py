"""LRN hyper-parameters, their validation, and the other frameworks' conventions.

lrnserve uses Caffe's parameterisation (docs/lrn.md): ``size`` is the window
length, ``alpha`` is divided by the number of elements in the window (``size``
across channels, ``size**2`` within a channel), and ``k`` is added before the
power in both modes. The ``from_*`` constructors translate other frameworks'
parameters into that form so that a model keeps the numbers it was trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Mode = Literal["across", "within"]
MODES: tuple[Mode, ...] = ("across", "within")


MAX_SIZE = 2**31 - 1
# alpha/size and k are used in float32 for float32, float16 and bfloat16 tensors.
MAX_FLOAT32 = 3.4028234663852886e38


@dataclass(frozen=True)
class Bound:
    """The one rule for a real-valued LRN parameter (alpha, beta, k). The op, the server's
    request parameters and the configuration all check with it, so they accept the same values
    and say so in the same words; each caller only prefixes where the value came from."""

    name: str
    minimum: float
    minimum_allowed: bool  # whether the minimum itself is valid
    maximum: float  # inclusive
    text: str  # what a valid value is, for messages

    def valid(self, value: float) -> bool:
        above = value >= self.minimum if self.minimum_allowed else value > self.minimum
        return math.isfinite(value) and above and value <= self.maximum

    def check(self, value: object, label: str | None = None) -> float:
        """``value`` as a float; ValueError naming ``label`` (default: the parameter's name)."""
        label = label or self.name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{label} must be a number, got {value!r}")
        number = float(value)
        if not self.valid(number):
            raise ValueError(f"{label} must be {self.text}, got {value!r}")
        return number


ALPHA = Bound("alpha", 0.0, True, MAX_FLOAT32, f"a finite number >= 0 (and <= {MAX_FLOAT32:.4g})")
BETA = Bound("beta", -math.inf, False, math.inf, "a finite number")
K = Bound("k", 0.0, False, MAX_FLOAT32, f"a finite number > 0 (and <= {MAX_FLOAT32:.4g})")
BOUNDS = {bound.name: bound for bound in (ALPHA, BETA, K)}


def check_size(size: object, maximum: int = MAX_SIZE, label: str = "size") -> int:
    """The window length; ``maximum`` lets a caller (the server) layer a tighter limit on top."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= maximum:
        raise ValueError(f"{label} must be an integer >= 1 (and <= {maximum}), got {size!r}")
    return size


def check_mode(mode: object, label: str = "mode") -> Mode:
    if mode == "across":
        return "across"
    if mode == "within":
        return "within"
    raise ValueError(f"{label} must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LRNParams:
    """One LRN layer's parameters in lrnserve's (Caffe's) convention, validated."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    mode: Mode = "across"

    def __post_init__(self) -> None:
        check_size(self.size)
        check_mode(self.mode)
        for bound in (ALPHA, BETA, K):
            object.__setattr__(self, bound.name, bound.check(getattr(self, bound.name)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_caffe(
        cls,
        local_size: int = 5,
        alpha: float = 1.0,
        beta: float = 0.75,
        k: float = 1.0,
        norm_region: str = "ACROSS_CHANNELS",
    ) -> LRNParams:
        """Caffe ``LRNParameter`` (its defaults). Caffe's WITHIN_CHANNEL ignores k; pass k=1."""
        regions: dict[str, Mode] = {"ACROSS_CHANNELS": "across", "WITHIN_CHANNEL": "within"}
        if norm_region not in regions:
            raise ValueError(f"norm_region must be ACROSS_CHANNELS or WITHIN_CHANNEL, got {norm_region!r}")
        return cls(local_size, alpha, beta, k, regions[norm_region])

    @classmethod
    def from_pytorch(cls, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> LRNParams:
        """``torch.nn.LocalResponseNorm``: the same meaning, across channels."""
        return cls(size, alpha, beta, k, "across")

    @classmethod
    def from_onnx(cls, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> LRNParams:
        """ONNX ``LRN``: ``bias`` is k."""
        return cls(size, alpha, beta, bias, "across")

    @classmethod
    def from_cudnn(
        cls, lrn_n: int = 5, lrn_alpha: float = 1e-4, lrn_beta: float = 0.75, lrn_k: float = 2.0
    ) -> LRNParams:
        """cuDNN ``cudnnSetLRNDescriptor`` (cross-channel; alpha already divided by N)."""
        return cls(lrn_n, lrn_alpha, lrn_beta, lrn_k, "across")

    @classmethod
    def from_mxnet(cls, nsize: int, alpha: float = 1e-4, beta: float = 0.75, knorm: float = 2.0) -> LRNParams:
        """MXNet ``LRN``: ``knorm`` is k (MXNet defaults it to 2)."""
        return cls(nsize, alpha, beta, knorm, "across")

    @classmethod
    def from_tensorflow(
        cls, depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0, beta: float = 0.5
    ) -> LRNParams:
        """``tf.nn.local_response_normalization`` (its defaults).

        TensorFlow's window is ``2 * depth_radius + 1`` channels and its alpha is
        not divided by the window, so lrnserve's alpha is ``alpha * size``.
        The data layout (TensorFlow's NHWC) is the caller's to transpose.
        """
        if isinstance(depth_radius, bool) or not isinstance(depth_radius, int) or depth_radius < 0:
            raise ValueError(f"depth_radius must be an integer >= 0, got {depth_radius!r}")
        size = 2 * depth_radius + 1
        return cls(size, _number("alpha", alpha) * size, beta, bias, "across")

    @classmethod
    def from_alexnet_paper(cls, n: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> LRNParams:
        """The AlexNet paper's literal formula (alpha not divided by n; k = 2)."""
        return cls(n, _number("alpha", alpha) * check_size(n), beta, k, "across")
