"""Build, cache and call the fused C++ LRN kernel (``csrc/lrn.cpp``), and beside it in the same
library the small-batch fully connected kernel, the channels-last max pool and convolution, and
the runner of a whole small network as one call (``csrc/linear.cpp``, ``pool.cpp``, ``conv.cpp``,
``chain.cpp``).

The kernel is a plain C ABI library compiled with the system C++ compiler the
first time it is needed and cached on disk, keyed by its source, flags and the
CPU's instruction-set level, so later processes load it in milliseconds. It is
called through ctypes, which releases the GIL for the duration of the call,
except for small tensors: there taking the GIL back (while the event loop
thread holds it) costs far more than the computation, so those calls keep it.
When no compiler is available the caller falls back to the composed torch
implementation; that decision is logged once, here.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ABI_VERSION = 6
SOURCES = tuple(
    Path(__file__).with_name("csrc") / name for name in ("lrn.cpp", "linear.cpp", "pool.cpp", "conv.cpp", "chain.cpp")
)
HEADERS = (Path(__file__).with_name("csrc") / "simd.h",)  # not compiled alone; part of the cache key
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_MODE_CODES = {"across": 0, "within": 1}
# Calls on at most this many elements keep the GIL: 30-75 us at size 5 on the 2-core CI machine
# ([1,64,32,32] and [1,16,64,64], across and within).
HOLD_GIL_ELEMENTS = 1 << 16
_ARGTYPES: list[Any] = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
]

# x86-64 micro-architecture levels (as gcc names them) and the CPU flags each needs.
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm"}),
    ("x86-64-v2", {"sse4_1", "sse4_2", "ssse3", "popcnt", "cx16"}),
)


class NativeKernel:
    """The loaded library; ``forward`` writes LRN(x) into ``out``."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        releasing = library.lrnserve_lrn_forward
        holding = ctypes.PyDLL(str(path)).lrnserve_lrn_forward  # the same code, called with the GIL held
        for fn in (releasing, holding):
            fn.restype = ctypes.c_int
            fn.argtypes = _ARGTYPES
        self._releasing = releasing
        self._holding = holding
        self._linear = library.lrnserve_linear_forward
        self._linear.restype = ctypes.c_int
        self._linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
        self._max_pool = library.lrnserve_max_pool_nhwc
        self._max_pool_holding = ctypes.PyDLL(str(path)).lrnserve_max_pool_nhwc
        for fn in (self._max_pool, self._max_pool_holding):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6 + [ctypes.c_int] * 7
        self.conv_block = int(library.lrnserve_conv_block())
        self._conv = library.lrnserve_conv_nhwc
        self._conv.restype = ctypes.c_int
        self._conv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_int] * 8
        self._chain = library.lrnserve_chain_forward
        self._chain.restype = ctypes.c_int
        self._chain.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._chain.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
        """``x @ weight.T + bias`` (then ReLU), for x [M, K] with a few rows M; float32, contiguous
        x and weight [O, K], on the CPU. Called without the GIL."""
        rows, inner = x.shape
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        bias_address = bias.data_ptr() if bias is not None else None
        rc = self._linear(
            x.data_ptr(), weight.data_ptr(), bias_address, out.data_ptr(), rows, inner, weight.shape[0],
            int(relu), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"native linear kernel rejected its arguments (code {rc})")
        return out

    def max_pool_nhwc(
        self, x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
        output: tuple[int, int],
    ) -> torch.Tensor:  # fmt: skip
        """Max pooling of x, a channels-last float32 CPU tensor [N, C, H, W], into a new
        channels-last tensor of spatial size ``output`` (computed by the caller as torch does)."""
        n, c, h, w = x.shape
        out = torch.empty(n, c, *output, dtype=torch.float32, memory_format=torch.channels_last)
        fn = self._max_pool_holding if x.numel() <= HOLD_GIL_ELEMENTS else self._max_pool
        rc = fn(x.data_ptr(), out.data_ptr(), n, c, h, w, *output, *kernel, *stride, *padding, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native max pool kernel rejected its arguments (code {rc})")
        return out

    def conv_nhwc(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, out_channels: int,
        kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], relu: bool,
    ) -> torch.Tensor:  # fmt: skip
        """The convolution of x, a channels-last float32 CPU tensor [N, C, H, W], with weights
        packed for this library (``models.chain.pack_conv_weight``) and a bias padded alike, into
        a new channels-last tensor. Called without the GIL."""
        n, c, h, w = x.shape
        oh = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
        ow = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
        padded_out = -(-out_channels // self.conv_block) * self.conv_block
        if (
            x.dtype != torch.float32
            or not x.is_contiguous(memory_format=torch.channels_last)
            or packed.numel() != padded_out * kernel[0] * kernel[1] * c
            or bias.numel() != padded_out
            or not (packed.is_contiguous() and bias.is_contiguous())
        ):
            raise ValueError("native convolution: x must be channels-last float32, weights and bias packed for it")
        out = torch.empty(n, out_channels, oh, ow, dtype=torch.float32, memory_format=torch.channels_last)
        padded = torch.empty(n * (h + 2 * padding[0]) * (w + 2 * padding[1]) * c, dtype=torch.float32)
        rc = self._conv(
            x.data_ptr(), packed.data_ptr(), bias.data_ptr(), out.data_ptr(), padded.data_ptr(), n, c, h, w,
            out_channels, oh, ow, *kernel, *stride, *padding, int(relu), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"native convolution kernel rejected its arguments (code {rc})")
        return out

    def chain_forward(
        self, program: int, count: int, params: int, x: int, out: int, workspace: int, samples: int,
        activation: int, threads: int,
    ) -> int:  # fmt: skip
        """``csrc/chain.cpp`` on addresses (the caller, ``models.chain.NativeChain``, keeps the
        memory alive); returns its code: 0, or minus two minus the index of the failed layer.
        Called without the GIL."""
        return int(self._chain(program, count, params, x, out, workspace, samples, activation, threads))

    def forward(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        mode: str,
        size: int,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        k: torch.Tensor,
        channels_last: bool = False,
    ) -> None:
        """x, out: contiguous NCHW on the CPU, or both channels-last contiguous; alpha/beta/k:
        contiguous float64, one per sample."""
        self.forward_raw(
            x.dtype,
            mode,
            x.data_ptr(),
            out.data_ptr(),
            tuple(x.shape),
            size,
            (alpha.data_ptr(), beta.data_ptr(), k.data_ptr()),
            torch.get_num_threads(),
            channels_last,
        )

    def forward_raw(
        self,
        dtype: torch.dtype,
        mode: str,
        x: int,
        out: int,
        shape: tuple[int, ...],
        size: int,
        alpha_beta_k: tuple[int, int, int],
        threads: int,
        channels_last: bool = False,
    ) -> None:
        """``forward`` on addresses: x and out contiguous NCHW of ``dtype`` (``shape``), or both
        channels-last (NHWC in memory) when ``channels_last``; alpha, beta and k contiguous
        float64, one per sample. The caller keeps the memory alive."""
        n, c, h, w = shape
        fn = self._holding if n * c * h * w <= HOLD_GIL_ELEMENTS else self._releasing
        alpha, beta, k = alpha_beta_k
        layout = 1 if channels_last else 0
        rc = fn(_DTYPE_CODES[dtype], _MODE_CODES[mode], layout, x, out, n, c, h, w, size, alpha, beta, k, threads)
        if rc != 0:
            raise RuntimeError(f"native LRN kernel rejected its arguments (code {rc})")


def cache_dir() -> Path:
    """Where built kernels live: $LRNSERVE_KERNEL_CACHE, else the user's cache directory."""
    explicit = os.environ.get("LRNSERVE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lrnserve" / "kernels"


def isa_level() -> str | None:
    """The highest x86-64 level this CPU supports, or None (other architectures: compiler default)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    required: set[str] = set()
    levels = []
    for name, needs in reversed(_X86_LEVELS):
        required |= needs
        levels.append((name, set(required)))
    best = None
    for name, needs in levels:
        if needs <= flags:
            best = name
    return best


def _flags(target: str | None) -> list[str]:
    flags = list(_BASE_FLAGS)
    if target:
        flags.append(f"-march={target}")
    return flags


def _library_path(target: str | None) -> Path:
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    digest.update(" ".join(_flags(target)).encode())
    digest.update(platform.machine().encode())
    name = f"liblrnserve-lrn-abi{ABI_VERSION}-{target or 'default'}-{digest.hexdigest()[:16]}.so"
    return cache_dir() / name


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _compile(target: str | None, destination: Path) -> None:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent processes never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=destination.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_flags(target), *(str(source) for source in SOURCES), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; other users (an image's runtime user) load it
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> NativeKernel:
    library = ctypes.CDLL(str(path))
    version = library.lrnserve_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {version}, expected {ABI_VERSION}")
    return NativeKernel(library, path)


class _Loader:
    """Loads (building if needed) the kernel once per process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._kernel: NativeKernel | None = None
        self.error: str | None = None

    def get(self) -> NativeKernel | None:
        if self._done:
            return self._kernel
        with self._lock:
            if not self._done:
                self._kernel = self._load()
                self._done = True
        return self._kernel

    def _load(self) -> NativeKernel | None:
        if os.environ.get("LRNSERVE_DISABLE_NATIVE", "") not in ("", "0"):
            self.error = "disabled by LRNSERVE_DISABLE_NATIVE"
            logger.warning("fused CPU LRN kernel %s; using the slower composed torch path", self.error)
            return None
        errors = []
        target = isa_level()
        for candidate in (target, None) if target else (None,):
            path = _library_path(candidate)
            try:
                if not path.exists():
                    logger.info("building fused CPU LRN kernel for %s -> %s", candidate or "default", path)
                    _compile(candidate, path)
                kernel = _open(path)
                logger.info("fused CPU LRN kernel loaded from %s", path)
                return kernel
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        self.error = "; ".join(errors)
        logger.warning(
            "fused CPU LRN kernel unavailable (%s); using the slower composed torch path. "
            "Install a C++ compiler (g++) for the fast path.",
            self.error,
        )
        return None


_loader = _Loader()


def kernel() -> NativeKernel | None:
    """The process-wide kernel, building it on first use; None when it cannot be built."""
    return _loader.get()


def unavailable_reason() -> str | None:
    return _loader.error


def build_all() -> list[Path]:
    """Build the kernel for every x86-64 level (and the compiler default) into cache_dir().

    For images built on one machine and run on others: the loader picks the build that
    matches the CPU it runs on, with no compiler needed at run time.
    """
    targets: list[str | None] = [None]
    if platform.machine().lower() in ("x86_64", "amd64"):
        targets = [name for name, _ in _X86_LEVELS] + [None]

    def build(target: str | None) -> Path:
        path = _library_path(target)
        if not path.exists():
            _compile(target, path)
        return path

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        built = list(pool.map(build, targets))
    for path in built:
        _open(path)
    return built


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the fused CPU LRN kernel ahead of time.")
    parser.add_argument("--build-all", action="store_true", help="every x86-64 level, not just this CPU's")
    args = parser.parse_args()
    if args.build_all:
        for path in build_all():
            print(path)
    else:
        found = kernel()
        if found is None:
            raise SystemExit(f"kernel unavailable: {unavailable_reason()}")
        print(found.path)
