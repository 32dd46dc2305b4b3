"""The LRN op against float64 loop references, torch's op, and its own contract."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import other_build
from hypothesis import given
from hypothesis import strategies as st

from lrnserve.server.ops import LocalResponseNorm, LRNParams, local_response_norm, native, prepare, triton_lrn
from lrnserve.server.ops.composed import local_response_norm_composed
from reference import lrn_reference

MODES = ("across", "within")
SHAPES = [(2, 7, 5, 6), (1, 1, 1, 1), (1, 3, 1, 1), (1, 1, 4, 3), (3, 20, 9, 4), (2, 4, 2, 2)]
SIZES = [1, 2, 3, 4, 5, 6, 7, 9, 12, 17]


def assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float = 1e-30) -> None:
    got = actual.detach().to(torch.float64).cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def test_native_kernel_builds_here() -> None:
    # CI has a compiler; the fast path must really be the one under test.
    assert native.kernel() is not None, native.unavailable_reason()
    assert prepare("cpu").startswith("fused C++ kernel")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(mode: str, size: int, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(size * 100 + len(mode))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    expected = lrn_reference(x.numpy(), size, 0.7, 0.75, 1.3, mode)
    assert_close(local_response_norm(x, size, 0.7, 0.75, 1.3, mode), expected, rtol=1e-13)
    x32 = x.float()
    expected32 = lrn_reference(x32.double().numpy(), size, 0.7, 0.75, 1.3, mode)
    assert_close(local_response_norm(x32, size, 0.7, 0.75, 1.3, mode), expected32, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.0, 0.3, -0.4, 2.5])
def test_every_power_path(mode: str, beta: float) -> None:
    x = torch.randn(2, 9, 6, 7, generator=torch.Generator().manual_seed(7)) * 4
    expected = lrn_reference(x.double().numpy(), 5, 2.0, beta, 0.8, mode)
    assert_close(local_response_norm(x, 5, 2.0, beta, 0.8, mode), expected, rtol=2e-6)
    assert_close(local_response_norm(x.double(), 5, 2.0, beta, 0.8, mode), expected, rtol=1e-13)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [*SIZES, 64, 1000])
@pytest.mark.parametrize("shape", [*SHAPES, (2, 96, 7, 5), (1, 16, 40, 3)])
def test_channels_last_matches_float64_reference(mode: str, size: int, shape: tuple[int, ...]) -> None:
    # The kernel's NHWC paths: what oneDNN's convolutions hand a network's LRN layers.
    gen = torch.Generator().manual_seed(size * 10 + shape[1])
    x = channels_last(torch.randn(shape, generator=gen, dtype=torch.float64) * 3)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        y = local_response_norm(x.to(dtype), size, 0.7, 0.75, 1.3, mode)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, lrn_reference(x.to(dtype).double().numpy(), size, 0.7, 0.75, 1.3, mode), rtol=rtol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.0, 0.3, -0.4, 2.5])
def test_channels_last_every_power_path_and_half_types(mode: str, beta: float) -> None:
    x = channels_last(torch.randn(3, 11, 6, 7, generator=torch.Generator().manual_seed(8)) * 4)
    expected = lrn_reference(x.double().numpy(), 5, 2.0, beta, 0.8, mode)
    assert_close(local_response_norm(x, 5, 2.0, beta, 0.8, mode), expected, rtol=2e-6)
    for dtype, rtol in ((torch.float16, 2e-3), (torch.bfloat16, 8e-3)):
        half = x.to(dtype)
        y = local_response_norm(half, 5, 2.0, beta, 0.8, mode)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, lrn_reference(half.double().numpy(), 5, 2.0, beta, 0.8, mode), rtol=rtol, atol=1e-3)


@pytest.fixture
def triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32/float16 CPU tensors through the Triton kernel (its interpreter); float64 stays native."""
    pytest.importorskip("triton")
    monkeypatch.setenv(triton_lrn.ENV, "triton")
    assert triton_lrn.selected(X)


@pytest.mark.usefixtures("triton_kernel")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, 2, 5, 12])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 1, 4, 3), (2, 4, 2, 2)])
def test_matches_float64_reference_in_triton_mode(mode: str, size: int, shape: tuple[int, ...]) -> None:
    # The interpreter runs program instances one by one: the matrix's small shapes only.
    test_matches_float64_reference(mode, size, shape)


@pytest.mark.usefixtures("triton_kernel")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.75, 0.5, -0.4, 2.5])
def test_every_power_path_in_triton_mode(mode: str, beta: float) -> None:
    test_every_power_path(mode, beta)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 11])
def test_across_matches_torch(size: int) -> None:
    x = torch.randn(4, 13, 7, 5, generator=torch.Generator().manual_seed(size))
    ours = local_response_norm(x, size, 1e-2, 0.75, 2.0)
    theirs = F.local_response_norm(x, size, 1e-2, 0.75, 2.0)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)


@given(
    n=st.integers(1, 3),
    c=st.integers(1, 12),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    size=st.integers(1, 13),
    alpha=st.floats(0, 10),
    beta=st.floats(-1, 3),
    k=st.floats(0.05, 10),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(
    n: int, c: int, h: int, w: int, size: int, alpha: float, beta: float, k: float, mode: str, seed: int
) -> None:
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 5
    expected = lrn_reference(x.double().numpy(), size, alpha, beta, k, mode)
    # Rounding of the window sum (<= size * 2^-24 relative) is amplified by |beta|.
    assert_close(local_response_norm(x, size, alpha, beta, k, mode), expected, rtol=5e-6)


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_parameters(mode: str) -> None:
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(3))
    alpha = [1e-4, 0.5, 2.0, 0.0]
    beta = [0.75, 0.5, 1.3, 1.0]
    k = [1.0, 2.0, 0.5, 3.0]
    batched = local_response_norm(x, 3, torch.tensor(alpha), beta, np.array(k), mode)
    for i in range(4):
        single = local_response_norm(x[i : i + 1], 3, alpha[i], beta[i], k[i], mode)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_float16_large_values_stay_finite(mode: str) -> None:
    # x^2 overflows float16 above ~256; the op must accumulate in float32.
    gen = torch.Generator().manual_seed(11)
    x = (torch.rand(2, 16, 9, 9, generator=gen) * 1200 - 600).half()
    y = local_response_norm(x, 5, 1e-4, 0.75, 1.0, mode)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    expected = lrn_reference(x.double().numpy(), 5, 1e-4, 0.75, 1.0, mode)
    assert_close(y, expected, rtol=2e-3)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16(mode: str) -> None:
    x = (torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5)) * 300).bfloat16()
    y = local_response_norm(x, 3, 1e-3, 0.75, 1.0, mode)
    assert y.dtype == torch.bfloat16
    expected = lrn_reference(x.double().numpy(), 3, 1e-3, 0.75, 1.0, mode)
    assert_close(y, expected, rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_rounding_matches_torch_casts(dtype: torch.dtype) -> None:
    # The kernel's own half conversions must round exactly like torch's, specials included.
    values = torch.tensor([0.0, -0.0, 1e-8, 6e-8, -3e-5, 1.0, 65504.0, -2.5, float("nan")])
    x = values.reshape(1, 1, 1, -1).to(dtype)
    y = local_response_norm(x, 1, 0.0, 0.75, 1.0)  # alpha 0: y == x exactly
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    finite = ~torch.isnan(x)
    assert torch.equal(y[finite], x[finite])
    gen = torch.Generator().manual_seed(1)
    for scale, k in ((1e3, 0.01), (1e-6, 1.0)):  # overflow to inf; subnormal results
        wide = (torch.randn(1, 4, 32, 32, generator=gen) * scale).to(dtype)
        y16 = local_response_norm(wide, 3, 1e-3, 1.0, k, "within")
        expected = local_response_norm(wide.float(), 3, 1e-3, 1.0, k, "within").to(dtype)
        assert y16.dtype == dtype
        assert torch.equal(y16, expected)


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_inputs_propagate_like_the_composed_op(mode: str) -> None:
    x = torch.randn(1, 6, 5, 5, generator=torch.Generator().manual_seed(2))
    x[0, 2, 1, 1] = float("nan")
    x[0, 4, 3, 3] = float("inf")
    native_y = local_response_norm(x, 3, 1e-2, 0.75, 1.0, mode)
    composed_y = _composed(x, 3, 1e-2, 0.75, 1.0, mode)
    assert torch.equal(torch.isnan(native_y), torch.isnan(composed_y))
    torch.testing.assert_close(native_y.nan_to_num(7.0), composed_y.nan_to_num(7.0), rtol=2e-6, atol=0)


def _composed(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, mode: str) -> torch.Tensor:
    n = x.shape[0]
    full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    return local_response_norm_composed(x, size, full(alpha), full(beta), full(k), mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_composed_path_matches_reference(mode: str, dtype: torch.dtype) -> None:
    # The composed op serves CUDA and compiler-less CPUs; check it on its own.
    x = (torch.randn(2, 7, 6, 5, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    for size in (1, 2, 5, 8):
        expected = lrn_reference(x.double().numpy(), size, 0.9, 0.75, 1.1, mode)
        rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 8e-3)
        assert_close(_composed(x, size, 0.9, 0.75, 1.1, mode), expected, rtol=rtol)


def per_sample_reference(
    x: np.ndarray, size: int, alpha: list[float], beta: list[float], k: list[float], mode: str
) -> np.ndarray:
    """Each sample with its own parameters, from the definition (the float64 loop reference)."""
    samples = [lrn_reference(x[i : i + 1], size, alpha[i], beta[i], k[i], mode) for i in range(x.shape[0])]
    return np.concatenate(samples)


def composed_per_sample(
    x: torch.Tensor, size: int, alpha: list[float], beta: list[float], k: list[float], mode: str
) -> torch.Tensor:
    """The composed op given one float64 value per sample, as the server's batches give it."""
    alpha_t, beta_t, k_t = (torch.tensor(v, dtype=torch.float64) for v in (alpha, beta, k))
    return local_response_norm_composed(x, size, alpha_t, beta_t, k_t, mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
def test_composed_path_per_sample_parameters(mode: str, size: int) -> None:
    # The composed op (CUDA, compiler-less CPUs, autograd) with other alpha, beta and k in each
    # sample, as a batch of requests with different parameters reaches it.
    x = torch.randn(4, 7, 6, 5, generator=torch.Generator().manual_seed(size), dtype=torch.float64) * 3
    alpha, beta, k = [1e-4, 0.5, 2.0, 0.0], [0.75, 0.5, 1.3, -0.4], [1.0, 2.0, 0.5, 3.0]
    expected = per_sample_reference(x.numpy(), size, alpha, beta, k, mode)
    assert_close(composed_per_sample(x, size, alpha, beta, k, mode), expected, rtol=1e-12)
    # Each sample really needs its own parameters: the first sample's for all would differ.
    shared = lrn_reference(x.numpy(), size, alpha[0], beta[0], k[0], mode)
    for i in range(1, 4):
        assert not np.allclose(expected[i], shared[i], rtol=1e-6), i
    # float32 computes in float32, with the same per-sample parameters.
    y32 = composed_per_sample(x.float(), size, alpha, beta, k, mode)
    assert y32.dtype == torch.float32
    assert_close(y32, per_sample_reference(x.float().double().numpy(), size, alpha, beta, k, mode), rtol=5e-6)


def test_non_contiguous_input() -> None:
    base = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(4))
    for x in (base[:, ::2, :, 1:7], base.to(memory_format=torch.channels_last), base.transpose(2, 3)):
        expected = lrn_reference(x.double().numpy(), 3, 0.5, 0.75, 1.0, "across")
        assert_close(local_response_norm(x, 3, 0.5, 0.75, 1.0), expected, rtol=1e-6)


def test_autograd_uses_a_differentiable_path() -> None:
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 3, 0.5, 0.75, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 3, 0.5, 0.75, 1.0, "within"), (x,))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [64, 1000, 4097])
def test_windows_larger_than_the_tensor(mode: str, size: int) -> None:
    # Clipped to the tensor for speed; the divisor stays the full window.
    x = torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    expected = lrn_reference(x.numpy(), size, 3.0, 0.75, 1.0, mode)
    assert_close(local_response_norm(x, size, 3.0, 0.75, 1.0, mode), expected, rtol=1e-13)
    assert_close(_composed(x, size, 3.0, 0.75, 1.0, mode), expected, rtol=1e-12)
    assert_close(local_response_norm(x.float(), size, 3.0, 0.75, 1.0, mode), expected, rtol=2e-6)


def test_empty_batch() -> None:
    y = local_response_norm(torch.empty(0, 3, 4, 4), 3)
    assert y.shape == (0, 3, 4, 4)


def test_module_wrapper() -> None:
    layer = LocalResponseNorm(5, 2e-4, 0.7, 1.5, "within")
    assert (layer.size, layer.alpha, layer.beta, layer.k, layer.mode) == (5, 2e-4, 0.7, 1.5, "within")
    assert "mode='within'" in repr(layer)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(layer(x), local_response_norm(x, 5, 2e-4, 0.7, 1.5, "within"), rtol=0, atol=0)
    same = LocalResponseNorm.from_params(LRNParams(5, 2e-4, 0.7, 1.5, "within"))
    assert same.params == layer.params


X = torch.zeros(1, 2, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be an integer >= 1"),
        ({"size": -3}, "size must be an integer >= 1"),
        ({"size": 2.5}, "size must be an integer >= 1"),
        ({"size": True}, "size must be an integer >= 1"),
        ({"mode": "spatial"}, "mode must be one of 'across', 'within'"),
        ({"alpha": -1e-4}, "alpha must be a finite number >= 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number >= 0"),
        ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"beta": float("-inf")}, "beta must be a finite number"),
        ({"k": 0.0}, "k must be a finite number > 0"),
        ({"k": -1.0}, "k must be a finite number > 0"),
        ({"k": float("inf")}, "k must be a finite number > 0"),
        ({"k": float("nan")}, "k must be a finite number > 0"),
        ({"x": torch.zeros(2, 3, 3)}, "x must be 4-D"),
        ({"x": torch.zeros(1, 1, 2, 3, 3)}, "x must be 4-D"),
        ({"x": torch.zeros(1, 2, 3, 3, dtype=torch.int64)}, "x must have dtype float32, float64"),
        ({"x": np.zeros((1, 2, 3, 3))}, "x must be a torch.Tensor"),
        ({"alpha": [1e-4, 1e-4, 1e-4]}, "alpha must be a number or 1 numbers"),
        (
            {"x": torch.zeros(2, 2, 3, 3), "k": [1.0, -2.0]},
            r"k\[1\] must be a finite number > 0 \(and <= 3\.403e\+38\), got -2\.0",
        ),
        ({"alpha": 1e39}, "alpha must be a finite number >= 0 \\(and <= 3.403e\\+38\\)"),
        ({"k": 1e39}, "k must be a finite number > 0 \\(and <= 3.403e\\+38\\)"),
        ({"size": 2**31}, "size must be an integer >= 1"),
        ({"x": torch.zeros(2, 2, 3, 3), "beta": [0.5, float("inf")]}, r"beta\[1\] must be a finite number"),
        ({"alpha": "big"}, "alpha must be a number"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"x": X, "size": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        local_response_norm(**args)  # type: ignore[arg-type]


def test_fallback_without_a_compiler(tmp_path: os.PathLike[str]) -> None:
    # A machine with no C++ compiler: the op warns once and stays correct.
    script = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from lrnserve.server.ops import local_response_norm, prepare
        print(prepare("cpu"))
        x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(0))
        torch.save(local_response_norm(x, 5, 0.1, 0.75, 1.0), "out.pt")
        """
    )
    env = {**os.environ, "PATH": str(tmp_path), "LRNSERVE_KERNEL_CACHE": str(tmp_path)}
    env.pop("CXX", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "composed torch ops" in result.stdout
    assert "fused CPU LRN kernel unavailable" in result.stderr
    assert "no C++ compiler found" in result.stderr
    y = torch.load(os.path.join(tmp_path, "out.pt"))
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    assert_close(y, lrn_reference(x.double().numpy(), 5, 0.1, 0.75, 1.0, "across"), rtol=1e-6)


def test_kernel_is_cached_on_disk() -> None:
    kernel = native.kernel()
    assert kernel is not None
    assert kernel.path.is_file()
    assert kernel.path.parent == native.cache_dir()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(mode: str, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 10, 7, 9, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    y = local_response_norm(x.cuda(), 5, 1e-3, 0.75, 1.0, mode)
    assert y.device.type == "cuda" and y.dtype == dtype
    expected = lrn_reference(x.double().numpy(), 5, 1e-3, 0.75, 1.0, mode)
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 8e-3)
    assert_close(y, expected, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize(("inner", "outer"), [(9216, 37), (1, 1), (33, 4), (100, 1001)])
@pytest.mark.parametrize("relu", [False, True])
def test_linear_kernel_matches_float64(rows: int, inner: int, outer: int, relu: bool) -> None:
    # The classifier's few-row kernel (csrc/linear.cpp) against numpy's float64 matmul.
    kernel = native.kernel()
    assert kernel is not None, native.unavailable_reason()
    gen = torch.Generator().manual_seed(rows * 1000 + inner + outer)
    x = torch.randn(rows, inner, generator=gen)
    weight = torch.randn(outer, inner, generator=gen) / inner**0.5
    for bias in (torch.randn(outer, generator=gen), None):
        expected = x.double().numpy() @ weight.double().numpy().T
        if bias is not None:
            expected = expected + bias.double().numpy()
        if relu:
            expected = np.maximum(expected, 0.0)
        got = kernel.linear(x, weight, bias, relu)
        assert got.shape == (rows, outer) and got.dtype == torch.float32
        scale = max(float(np.abs(expected).max()), 1e-30)
        np.testing.assert_allclose(got.double().numpy() / scale, expected / scale, rtol=0, atol=2e-6)


@pytest.mark.parametrize("target", ["x86-64-v3", None])
def test_linear_kernel_other_builds(target: str | None, tmp_path: Path) -> None:
    # The loaded build is this CPU's best level; the AVX2 and compiler-default builds tile
    # differently (8 lanes, two samples per tile), so they are built and checked here too.
    kernel = other_build(target, tmp_path)
    gen = torch.Generator().manual_seed(5)
    for rows, inner, outer in [(1, 9216, 9), (3, 100, 1001), (5, 33, 4), (16, 4096, 7)]:
        x = torch.randn(rows, inner, generator=gen)
        weight = torch.randn(outer, inner, generator=gen) / inner**0.5
        bias = torch.randn(outer, generator=gen)
        expected = x.double().numpy() @ weight.double().numpy().T + bias.double().numpy()
        got = kernel.linear(x, weight, bias, False).double().numpy()
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got / scale, expected / scale, rtol=0, atol=2e-6)


def test_a_changed_header_is_a_new_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernels include csrc/simd.h: a cached library built from another version of it must
    # not be loaded, so the header is part of the library's name (its cache key).
    before = native._library_path(None)
    header = tmp_path / "simd.h"
    header.write_bytes(native.HEADERS[0].read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(native, "HEADERS", (header,))
    assert native._library_path(None) != before


def test_linear_kernel_relu_keeps_nan() -> None:
    kernel = native.kernel()
    assert kernel is not None
    x = torch.tensor([[1.0, -2.0], [float("nan"), 0.5]])
    got = kernel.linear(x, torch.eye(2), None, True)  # like torch.relu: negatives to 0, NaN stays
    assert got[0].tolist() == [1.0, 0.0] and torch.isnan(got[1]).all()
