"""The fused LRN kernel in the Triton language: the op's implementation for CUDA tensors.

Triton is optional (CUDA builds of torch bring it; the dev extra installs it for the interpreter),
so it is imported on first use and this module imports without it. Which tensors run here
(``selected``):

- CUDA tensors of float32, float16 and bfloat16 when Triton imports; without Triton the op falls
  back to the composed torch version and logs that once. float64 stays on the composed version.
- CPU tensors of float32 and float16 when ``LRNSERVE_LRN_KERNEL=triton`` (for tests: CI has no
  GPU), through Triton's interpreter (one program instance at a time: small shapes only; numpy
  has no bfloat16). Then a missing Triton raises: a test of the kernel must never pass on
  another implementation.

The kernels themselves are in ``triton_kernels`` (design and reads per element there).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Any

import torch

from .params import Mode

logger = logging.getLogger(__name__)

ENV = "LRNSERVE_LRN_KERNEL"
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)
_MAX_BLOCK = 1024
_MIN_BLOCK = 64
# Enough programs to fill a large GPU; fewer and the channel (row) axis is split into chunks.
_TARGET_PROGRAMS = 2048


class _Loader:
    """Imports Triton once per process and wraps the kernels twice, compiled and interpreted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._kernels: dict[bool, tuple[Any, Any]] = {}
        self.error: str | None = None
        self._warned = False

    def kernels(self, interpret: bool) -> tuple[Any, Any] | None:
        """(across, within) launchable kernels, or None when Triton does not import."""
        if not self._done:
            with self._lock:
                if not self._done:
                    self._load()
                    self._done = True
        return self._kernels.get(interpret)

    def _load(self) -> None:
        try:
            triton = importlib.import_module("triton")
            interpreter = importlib.import_module("triton.runtime.interpreter")
            source: ModuleType = importlib.import_module(f"{__package__}.triton_kernels")
        except ImportError as exc:  # Triton absent, or broken (no matching driver, ...)
            self.error = f"triton does not import: {exc}"
            return
        functions = (source.lrn_across, source.lrn_within)
        # Triton compiles one variant per divisibility class of each integer argument. Only the
        # extent the pixel block runs along (HW, W) decides how wide the loads may be; the others
        # would just multiply the variants (and the first-use compiles) for nothing.
        self._kernels[False] = (
            triton.jit(functions[0], do_not_specialize=["p_stride", "C", "before", "after", "chunk"]),
            triton.jit(
                functions[1],
                do_not_specialize=["p_stride", "C", "H", "before", "after", "left", "right", "chunk"],
            ),
        )
        self._kernels[True] = (
            interpreter.InterpretedFunction(functions[0]),
            interpreter.InterpretedFunction(functions[1]),
        )

    def warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("Triton LRN kernel unavailable (%s); CUDA tensors use the composed torch ops", self.error)


_loader = _Loader()


def load(interpret: bool) -> tuple[Any, Any] | None:
    """The kernels (``_loader``'s); a seam for tests that simulate a missing Triton."""
    return _loader.kernels(interpret)


def requested() -> bool:
    """Whether ``LRNSERVE_LRN_KERNEL=triton`` asks for the kernel on CPU tensors too."""
    return os.environ.get(ENV, "") == "triton"


def selected(x: torch.Tensor) -> bool:
    """Whether ``x`` runs on the Triton kernel (the rules in the module docstring)."""
    if x.device.type == "cuda":
        if x.dtype not in CUDA_DTYPES:
            return False
        if load(interpret=False) is None:
            _loader.warn_once()
            return False
        return True
    if x.device.type == "cpu" and x.dtype in INTERPRETER_DTYPES and requested():
        if load(interpret=True) is None:
            raise RuntimeError(f"{ENV}=triton but the Triton kernel is unavailable: {_loader.error}")
        return True
    return False


def available() -> bool:
    return load(interpret=False) is not None


def unavailable_reason() -> str | None:
    return _loader.error


def _parameters(
    size: int, alpha: torch.Tensor, beta: torch.Tensor, k: torch.Tensor, mode: Mode, device: torch.device
) -> torch.Tensor:
    """float32 (alpha / window, beta, k) per sample on ``device``: the values the C++ kernel
    computes in (alpha divided in float64 first)."""
    window = size if mode == "across" else size * size
    host = torch.stack([alpha.to(torch.float64) / window, beta.to(torch.float64), k.to(torch.float64)], dim=1)
    return host.to(torch.float32).to(device).contiguous()


def _launch_shape(programs: int, extent: int, axis: int, size: int) -> tuple[int, int, int]:
    """(block, blocks, chunk): a power-of-two block over ``extent`` and a chunk of the sliding
    ``axis``, shrunk until about _TARGET_PROGRAMS programs run; a chunk stays at least twice the
    window, so its extra first sums stay a fraction of its work."""
    block = min(_MAX_BLOCK, max(_MIN_BLOCK, 1 << (extent - 1).bit_length()))
    while block > _MIN_BLOCK and programs * -(-extent // (block // 2)) <= _TARGET_PROGRAMS:
        block //= 2
    blocks = -(-extent // block)
    chunk = axis
    floor = max(8, 2 * min(size, axis))
    while chunk // 2 >= floor and programs * blocks * -(-axis // chunk) < _TARGET_PROGRAMS:
        chunk = -(-chunk // 2)
    return block, blocks, chunk


def forward(
    x: torch.Tensor, size: int, alpha: torch.Tensor, beta: torch.Tensor, k: torch.Tensor, mode: Mode
) -> torch.Tensor:
    """LRN(x) in a new contiguous tensor of x's dtype and device.

    x: NCHW float32/float16/bfloat16 (float32/float16 on the CPU), any strides, checked by the
    caller; alpha, beta, k: one value per sample (shape [N]) or one for all (shape [1]).
    """
    return _launch(x, size, _parameters(size, alpha, beta, k, mode, x.device), mode)


def _launch(x: torch.Tensor, size: int, params: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Run the kernel for ``mode``; params: float32 [N, 3] or [1, 3] on x's device."""
    kernels = load(interpret=x.device.type != "cuda")
    if kernels is None:
        raise RuntimeError(f"the Triton LRN kernel is unavailable: {_loader.error}")
    source = x.contiguous()
    out = torch.empty_like(source, memory_format=torch.contiguous_format)
    if source.numel() == 0:
        return out
    n, c, h, w = source.shape
    p_stride = 3 if params.shape[0] == n and n > 1 else 0
    before, after = size // 2, (size - 1) // 2
    across, within = kernels
    if mode == "across":
        block, blocks, chunk = _launch_shape(n, h * w, c, size)
        grid = (n, blocks, -(-c // chunk))
        across[grid](source, out, params, p_stride, c, h * w, min(before, c), min(after, c), chunk, BLOCK=block)
    else:
        block, blocks, chunk = _launch_shape(n * c, w, h, size)
        grid = (n * c, blocks, -(-h // chunk))
        left, right = min(before, w - 1), min(after, w - 1)
        within[grid](
            source, out, params, p_stride, c, h, w, min(before, h), min(after, h), left, right, chunk, BLOCK=block
        )
    return out


class _ScalarParameters:
    """Device tensors of one (alpha / window, beta, k) for all samples, made once per layer's
    parameter set and device: a network calls the op with the same few sets at every batch, and a
    host-to-device copy per call would cost more than a small batch's kernel."""

    LIMIT = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[torch.device, int, float, float, float, Mode], torch.Tensor] = {}

    def get(self, device: torch.device, size: int, alpha: float, beta: float, k: float, mode: Mode) -> torch.Tensor:
        key = (device, size, alpha, beta, k, mode)
        found = self._entries.get(key)
        if found is not None:
            return found
        a, b, c = (torch.tensor([v], dtype=torch.float64) for v in (alpha, beta, k))
        made = _parameters(size, a, b, c, mode, device)
        with self._lock:
            if len(self._entries) >= self.LIMIT:
                self._entries.clear()
            self._entries[key] = made
        return made


_scalar_parameters = _ScalarParameters()


def forward_scalar(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: Mode) -> torch.Tensor:
    """:func:`forward` with one alpha, beta and k for every sample (network layers)."""
    return _launch(x, size, _scalar_parameters.get(x.device, size, alpha, beta, k, mode), mode)


WARM_UP_SHAPES = ((1, 96, 55, 55), (4, 256, 27, 27), (2, 8, 4, 4))


def warm_up(device: torch.device, size: int, alpha: float, beta: float, k: float) -> int:
    """Compile the kernels a served LRN model will use (both modes, every CUDA dtype, the classic
    networks' shapes) at load, so that those requests never wait for Triton; returns the launches.
    Other shapes may compile a variant on first use; Triton keeps compiled kernels on disk."""
    launches = 0
    for dtype in CUDA_DTYPES:
        for shape in WARM_UP_SHAPES:
            x = torch.ones(shape, dtype=dtype, device=device)
            for mode in ("across", "within"):
                forward_scalar(x, size, alpha, beta, k, mode)
                launches += 1
    torch.cuda.synchronize(device)
    return launches
