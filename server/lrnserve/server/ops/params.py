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


def check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer >= 1 (and <= {MAX_SIZE}), got {size!r}")
    return size


def check_mode(mode: object) -> Mode:
    if mode == "across":
        return "across"
    if mode == "within":
        return "within"
    raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")


def check_alpha(alpha: float) -> float:
    if not math.isfinite(alpha) or not 0 <= alpha <= MAX_FLOAT32:
        raise ValueError(f"alpha must be a finite number >= 0 (and <= {MAX_FLOAT32:.4g}), got {alpha!r}")
    return float(alpha)


def check_beta(beta: float) -> float:
    if not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    return float(beta)


def check_k(k: float) -> float:
    if not math.isfinite(k) or not 0 < k <= MAX_FLOAT32:
        raise ValueError(f"k must be a finite number > 0 (and <= {MAX_FLOAT32:.4g}), got {k!r}")
    return float(k)


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
        object.__setattr__(self, "alpha", check_alpha(_number("alpha", self.alpha)))
        object.__setattr__(self, "beta", check_beta(_number("beta", self.beta)))
        object.__setattr__(self, "k", check_k(_number("k", self.k)))

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
