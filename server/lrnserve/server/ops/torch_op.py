"""LRN as a registered torch operator: ``torch.ops.lrnserve.local_response_norm``.

Schema: ``lrnserve::local_response_norm(Tensor x, int size, float alpha, float beta, float k,
str mode) -> Tensor`` (scalar parameters; the server's per-sample batches keep calling
``local_response_norm_checked``, which feeds the kernel one value per sample).

- CPU: the fused C++ kernel (``native``), or the composed torch ops when it cannot be built;
  the Triton kernel through Triton's interpreter with ``LRNSERVE_LRN_KERNEL=triton`` (tests);
- CUDA: the fused Triton kernel (``triton_lrn``); the composed torch ops for float64, or when
  Triton does not import (logged once);
- every other device: the composed torch ops;
- fake/meta tensors (torch.compile, torch.export, the ONNX exporter): a tensor of x's shape and
  dtype in the output's layout (``output_format``: channels-last for a channels-last CPU input,
  which the fused kernel computes in that layout; contiguous otherwise);
- autograd: an analytic backward in torch ops (``composed.local_response_norm_backward``).

Because the dispatcher sees the op, ``torch.jit.trace`` records it instead of baking its output
in, torch.compile keeps it as one opaque node (no graph break), and ``torch.export`` and
``torch.onnx.export`` (see ``onnx_export``) carry it as ``lrnserve.local_response_norm``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import native, triton_lrn
from .composed import local_response_norm_backward, local_response_norm_composed
from .params import ALPHA, BETA, K, Mode, check_mode, check_size

OP_NAME = "lrnserve::local_response_norm"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_input(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"x must have dtype {names}; got {str(x.dtype).removeprefix('torch.')}")
    return x


def _check(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: str) -> Mode:
    """The op's own argument check: it may be called directly (torch.ops...), not only through
    ``local_response_norm``."""
    check_input(x)
    check_size(size)
    ALPHA.check(alpha)
    BETA.check(beta)
    K.check(k)
    return check_mode(mode)


def channels_last(x: torch.Tensor) -> bool:
    """x is NHWC in memory (and not also NCHW, as when C or H * W is 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def output_format(x: torch.Tensor, mode: str) -> torch.memory_format:
    """The layout of the op's output: channels-last for a channels-last CPU input (the fused
    kernel reads and writes it in place of a copy each way, and oneDNN's convolutions produce
    it), contiguous NCHW otherwise. ``mode`` does not matter: both modes have an NHWC path."""
    if x.device.type == "cpu" and channels_last(x):
        return torch.channels_last
    return torch.contiguous_format


def _scalars(
    alpha: float, beta: float, k: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha_t, beta_t, k_t = (torch.tensor([v], dtype=torch.float64, device=device) for v in (alpha, beta, k))
    return alpha_t, beta_t, k_t


class _PerSampleCache:
    """float64 [N] tensors of alpha, beta and k for the kernel, built once per (N, alpha, beta, k):
    a network calls the op with the same few parameter sets at every batch."""

    LIMIT = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, float, float, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, batch: int, alpha: float, beta: float, k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (batch, alpha, beta, k)
        found = self._entries.get(key)
        if found is not None:
            return found
        made = (
            torch.full((batch,), alpha, dtype=torch.float64),
            torch.full((batch,), beta, dtype=torch.float64),
            torch.full((batch,), k, dtype=torch.float64),
        )
        with self._lock:
            if len(self._entries) >= self.LIMIT:
                self._entries.clear()
            self._entries[key] = made
        return made


_per_sample = _PerSampleCache()


@torch.library.custom_op(OP_NAME, mutates_args=())
def local_response_norm_op(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: str) -> torch.Tensor:
    """Every device without a kernel of its own: the composed torch ops."""
    checked = _check(x, size, alpha, beta, k, mode)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return local_response_norm_composed(x, size, *_scalars(alpha, beta, k, x.device), checked).contiguous()


@local_response_norm_op.register_kernel("cuda")
def _cuda(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: str) -> torch.Tensor:
    checked = _check(x, size, alpha, beta, k, mode)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if triton_lrn.selected(x):
        return triton_lrn.forward_scalar(x, size, alpha, beta, k, checked)
    return local_response_norm_composed(x, size, *_scalars(alpha, beta, k, x.device), checked).contiguous()


@local_response_norm_op.register_kernel("cpu")
def _cpu(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: str) -> torch.Tensor:
    return cpu_forward(x, size, alpha, beta, k, _check(x, size, alpha, beta, k, mode))


def direct_call_unobserved(x: torch.Tensor) -> bool:
    """Whether calling ``cpu_forward`` in place of the op is invisible to everything that watches
    the dispatcher: a plain CPU tensor, no autograd graph to record, and no jit trace,
    torch.compile or export, dispatch or function mode, or profiler active. Going through the
    dispatcher to the op's Python kernel costs about 12 us a call (2-core CI machine: a module call
    on [1, 32, 2, 2] took 24 us through it, 12 us direct), more than the kernel's own work on
    cifar10_full's [1, 32, 16, 16] activations (about 8 us); the checks here cost 1 us."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo reads it as True and traces no further
        and type(x) is torch.Tensor
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._get_tracing_state() is None
        and not torch._C._autograd._profiler_enabled()
    )


def cpu_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, checked: Mode) -> torch.Tensor:
    """The op's CPU kernel on arguments already checked (``_check``)."""
    layout = output_format(x, checked)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=layout)
    if triton_lrn.selected(x):
        return triton_lrn.forward_scalar(x, size, alpha, beta, k, checked).contiguous(memory_format=layout)
    kernel = native.kernel()
    if kernel is None:
        composed = local_response_norm_composed(x, size, *_scalars(alpha, beta, k, x.device), checked)
        return composed.contiguous(memory_format=layout)
    nhwc = layout == torch.channels_last
    source = x if nhwc else x.contiguous()
    out = torch.empty_like(source, memory_format=layout)
    kernel.forward(source, out, checked, size, *_per_sample.get(x.shape[0], alpha, beta, k), channels_last=nhwc)
    return out


@local_response_norm_op.register_fake
def _fake(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: str) -> torch.Tensor:
    _check(x, size, alpha, beta, k, mode)
    return torch.empty_like(x, memory_format=output_format(x, mode))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, size, alpha, beta, k, mode = inputs
    ctx.save_for_backward(x)
    ctx.lrn = (size, alpha, beta, k, mode)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None]:
    (x,) = ctx.saved_tensors
    size, alpha, beta, k, mode = ctx.lrn
    return local_response_norm_backward(grad, x, size, alpha, beta, k, mode), None, None, None, None, None


local_response_norm_op.register_autograd(_backward, setup_context=_setup_context)

# The overload the wrappers call: the dispatcher directly, without CustomOpDef's Python layer.
lrn_overload = torch.ops.lrnserve.local_response_norm.default
