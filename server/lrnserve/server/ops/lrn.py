"""The public LRN operation and its ``torch.nn.Module`` wrapper.

``local_response_norm`` validates its arguments, then runs the fused C++
kernel for CPU tensors (``native``), the fused Triton kernel for CUDA tensors
(``triton_lrn``), or the composed torch version otherwise (``composed``).
``alpha``, ``beta`` and ``k`` may be scalars or one value per sample, which is
what lets the server batch requests that differ in them.
Scalar parameters (every network layer) go through the registered torch
operator ``torch.ops.lrnserve.local_response_norm`` (``torch_op``), so that
torch.jit.trace, torch.compile, torch.export and torch.onnx.export see it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import native, triton_lrn
from .composed import local_response_norm_composed
from .params import ALPHA, BETA, Bound, K, LRNParams, Mode, check_mode, check_size
from .torch_op import check_input, cpu_forward, direct_call_unobserved, lrn_overload

PerSample = float | Sequence[float] | torch.Tensor


def per_sample(bound: Bound, value: PerSample, batch: int) -> torch.Tensor:
    """One float64 CPU value per sample, each checked by ``bound``."""
    if isinstance(value, (bool, int, float)):
        return torch.full((batch,), bound.check(value), dtype=torch.float64)
    try:
        values = torch.as_tensor(value, dtype=torch.float64, device="cpu").reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{bound.name} must be a number or one number per sample: {exc}") from None
    if values.numel() == 1:
        return torch.full((batch,), bound.check(float(values.item())), dtype=torch.float64)
    if values.numel() != batch:
        raise ValueError(f"{bound.name} must be a number or {batch} numbers (one per sample), got {values.numel()}")
    for index, number in enumerate(values.tolist()):  # one value per sample: a batch's worth
        bound.check(number, f"{bound.name}[{index}]")
    return values.contiguous()


def _scalar(value: object) -> bool:
    return isinstance(value, (int, float))  # bools included: the bound check rejects them by name


def local_response_norm(
    x: torch.Tensor,
    size: int,
    alpha: PerSample = 1e-4,
    beta: PerSample = 0.75,
    k: PerSample = 1.0,
    mode: Mode = "across",
) -> torch.Tensor:
    """Local Response Normalization of an NCHW tensor with Caffe's semantics.

    across: ``y = x / (k + alpha/size * sum over size channels of x^2) ** beta``;
    within: the same over a ``size x size`` window in each channel with
    ``alpha/size**2``. Zero padding, the full window as divisor, and for even
    sizes PyTorch's window ``[c - size//2, c + (size-1)//2]``. Returns a new
    contiguous tensor of x's dtype on x's device. With scalar alpha, beta
    and k this is the torch operator ``torch.ops.lrnserve.local_response_norm``.
    """
    x = check_input(x)
    size = check_size(size)
    mode = check_mode(mode)
    if _scalar(alpha) and _scalar(beta) and _scalar(k):
        return lrn_overload(x, size, ALPHA.check(alpha), BETA.check(beta), K.check(k), mode)  # type: ignore[no-any-return]
    batch = x.shape[0]
    alpha_t, beta_t, k_t = (per_sample(ALPHA, alpha, batch), per_sample(BETA, beta, batch), per_sample(K, k, batch))
    return local_response_norm_checked(x, size, alpha_t, beta_t, k_t, mode)


def local_response_norm_checked(
    x: torch.Tensor, size: int, alpha: torch.Tensor, beta: torch.Tensor, k: torch.Tensor, mode: Mode
) -> torch.Tensor:
    """:func:`local_response_norm` for arguments validated already (the server's batches):
    x a supported NCHW tensor; alpha, beta, k contiguous float64 CPU tensors, one value per sample."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    needs_graph = x.requires_grad and torch.is_grad_enabled()
    if not needs_graph and triton_lrn.selected(x):
        return triton_lrn.forward(x, size, alpha, beta, k, mode)
    if x.device.type == "cpu" and not needs_graph:
        kernel = native.kernel()
        if kernel is not None:
            source = x.contiguous()
            out = torch.empty_like(source, memory_format=torch.contiguous_format)
            kernel.forward(source, out, mode, size, alpha, beta, k)
            return out
    return local_response_norm_composed(x, size, alpha, beta, k, mode)


def prepare(device: torch.device | str = "cpu") -> str:
    """Build or load what the op needs on ``device`` now, not in the first request.

    Returns a one-line description of the implementation that will run.
    """
    device = torch.device(device)
    if device.type == "cpu":
        kernel = native.kernel()
        if kernel is not None:
            return f"fused C++ kernel ({kernel.path.name})"
        return f"composed torch ops (fused kernel unavailable: {native.unavailable_reason()})"
    if device.type == "cuda":
        if triton_lrn.available():
            return "fused Triton kernel (compiled per dtype and mode on first use)"
        return f"composed torch ops on cuda (Triton kernel unavailable: {triton_lrn.unavailable_reason()})"
    return f"composed torch ops on {device.type}"


class LocalResponseNorm(nn.Module):
    """``torch.nn.Module`` form of :func:`local_response_norm` with fixed parameters."""

    def __init__(
        self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, mode: Mode = "across"
    ) -> None:
        super().__init__()
        self.params = LRNParams(size, alpha, beta, k, mode)

    @classmethod
    def from_params(cls, params: LRNParams) -> LocalResponseNorm:
        return cls(params.size, params.alpha, params.beta, params.k, params.mode)

    @property
    def size(self) -> int:
        return self.params.size

    @property
    def alpha(self) -> float:
        return self.params.alpha

    @property
    def beta(self) -> float:
        return self.params.beta

    @property
    def k(self) -> float:
        return self.params.k

    @property
    def mode(self) -> Mode:
        return self.params.mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params  # validated when the module was made; the op checks them again
        x = check_input(x)
        if direct_call_unobserved(x):  # the op's CPU kernel, skipping the dispatcher's round trip
            return cpu_forward(x, p.size, p.alpha, p.beta, p.k, p.mode)
        return lrn_overload(x, p.size, p.alpha, p.beta, p.k, p.mode)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        p = self.params
        return f"size={p.size}, alpha={p.alpha}, beta={p.beta}, k={p.k}, mode={p.mode!r}"
