"""The fused Triton LRN kernel, run on CPU tensors through Triton's interpreter.

``LRNSERVE_LRN_KERNEL=triton`` (set by the ``triton_mode`` fixture) sends CPU float32/float16
tensors to the kernel; the interpreter is chosen per tensor (CPU tensors only), so no
``TRITON_INTERPRET`` is needed and CUDA tests in the same process still run compiled kernels.
References come from outside the project's code: torch's own LRN, and the float64 loops of
tests/reference.py. Shapes stay small: the interpreter runs program instances one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from lrnserve.server.models import ir
from lrnserve.server.models.graph_ops import LRNStep
from lrnserve.server.ops import LocalResponseNorm, local_response_norm, triton_lrn
from reference import lrn_reference

MODES = ("across", "within")


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes the Triton kernel ran on, so that no test passes on another implementation."""
    seen: list[tuple[int, ...]] = []
    launch = triton_lrn._launch

    def counting(x: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return launch(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_lrn, "_launch", counting)
    return seen


@pytest.fixture
def triton_mode(monkeypatch: pytest.MonkeyPatch, launches: list[tuple[int, ...]]) -> Iterator[None]:
    monkeypatch.setenv(triton_lrn.ENV, "triton")
    yield
    assert launches, "the Triton kernel never ran"


def assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=rtol, atol=1e-30)


def mirrored_reference(x: np.ndarray, size: int, alpha: float, beta: float, k: float, mode: str) -> np.ndarray:
    """ONNX's window for even sizes (the extra neighbour after the centre): PyTorch's, mirrored."""
    axes = (1,) if mode == "across" else (2, 3)
    return np.flip(lrn_reference(np.flip(x, axes), size, alpha, beta, k, mode), axes)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_across_matches_torch(size: int, dtype: torch.dtype) -> None:
    x = (torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(size)) * 3).to(dtype)
    ours = local_response_norm(x, size, 1e-2, 0.75, 2.0)
    theirs = F.local_response_norm(x.float(), size, 1e-2, 0.75, 2.0).to(dtype)
    assert ours.dtype == dtype
    tol = {"rtol": 2e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
def test_matches_float64_reference(mode: str, size: int) -> None:
    shape = (2, 7, 5, 6) if mode == "across" else (2, 3, 5, 6)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(size * 10 + len(mode))) * 3
    for beta in (0.75, 0.4):  # the kernel's two power paths
        expected = lrn_reference(x.double().numpy(), size, 0.7, beta, 1.3, mode)
        assert_close(local_response_norm(x, size, 0.7, beta, 1.3, mode), expected, rtol=1e-6)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [2, 4, 3])
def test_onnx_window_through_the_graph_step(mode: str, size: int) -> None:
    # ONNX's even window is PyTorch's mirrored; the graph step flips around the kernel.
    x = torch.randn(2, 5, 4, 5, generator=torch.Generator().manual_seed(size)) * 3
    step = LRNStep(ir.LRN(size, 0.9, 0.75, 1.1, mode, "after"), LocalResponseNorm.from_params)
    expected = mirrored_reference(x.double().numpy(), size, 0.9, 0.75, 1.1, mode)
    assert_close(step(x), expected, rtol=1e-6)
    if size % 2 == 0:  # the two conventions really differ
        assert not np.allclose(expected, lrn_reference(x.double().numpy(), size, 0.9, 0.75, 1.1, mode), rtol=1e-6)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [6, 9, 64, 1001])
def test_windows_larger_than_the_tensor(mode: str, size: int) -> None:
    x = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(size))
    expected = lrn_reference(x.double().numpy(), size, 3.0, 0.75, 1.0, mode)
    assert_close(local_response_norm(x, size, 3.0, 0.75, 1.0, mode), expected, rtol=2e-6)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [3, 4])
def test_per_sample_parameters(mode: str, size: int) -> None:
    x = torch.randn(4, 5, 4, 5, generator=torch.Generator().manual_seed(size)) * 3
    alpha, beta, k = [1e-4, 0.5, 2.0, 0.0], [0.75, 0.5, 1.3, -0.4], [1.0, 2.0, 0.5, 3.0]
    y = local_response_norm(x, size, torch.tensor(alpha), beta, np.array(k), mode)
    samples = [lrn_reference(x[i : i + 1].double().numpy(), size, alpha[i], beta[i], k[i], mode) for i in range(4)]
    expected = np.concatenate(samples)
    assert_close(y, expected, rtol=2e-6)
    shared = lrn_reference(x.double().numpy(), size, alpha[0], beta[0], k[0], mode)
    for i in range(1, 4):  # each sample really used its own parameters
        assert not np.allclose(expected[i], shared[i], rtol=1e-6), i


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("mode", MODES)
def test_float16_accumulates_in_float32(mode: str) -> None:
    # x^2 overflows float16 above ~256.
    x = (torch.rand(2, 4, 5, 5, generator=torch.Generator().manual_seed(11)) * 1200 - 600).half()
    y = local_response_norm(x, 3, 1e-4, 0.75, 1.0, mode)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert_close(y, lrn_reference(x.double().numpy(), 3, 1e-4, 0.75, 1.0, mode), rtol=2e-3)


@pytest.mark.usefixtures("triton_mode")
def test_non_contiguous_input() -> None:
    base = torch.randn(2, 8, 4, 10, generator=torch.Generator().manual_seed(4))
    nhwc = base.to(memory_format=torch.channels_last)
    for x in (base[:, ::2, :, 1:7], nhwc, base.transpose(2, 3)):
        for mode in MODES:
            expected = lrn_reference(x.double().numpy(), 3, 0.5, 0.75, 1.0, mode)
            y = local_response_norm(x, 3, 0.5, 0.75, 1.0, mode)
            # The op's layout on the CPU, whichever kernel runs: channels-last in, channels-last out.
            layout = torch.channels_last if x is nhwc else torch.contiguous_format
            assert y.is_contiguous(memory_format=layout)
            assert_close(y, expected, rtol=1e-6)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize(("mode", "shape"), [("across", (1, 40, 2, 2)), ("within", (1, 1, 40, 3))])
def test_chunked_axis(mode: str, shape: tuple[int, ...]) -> None:
    # Few programs: the sliding axis is split into chunks, each starting its own running sum.
    n, c, h, w = shape
    if mode == "across":
        _, _, chunk = triton_lrn._launch_shape(n, h * w, c, 3)
        assert chunk < c
    else:
        _, _, chunk = triton_lrn._launch_shape(n * c, w, h, 3)
        assert chunk < h
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 3
    for size in (3, 4):
        expected = lrn_reference(x.double().numpy(), size, 0.8, 0.75, 1.0, mode)
        assert_close(local_response_norm(x, size, 0.8, 0.75, 1.0, mode), expected, rtol=1e-6)


@pytest.mark.usefixtures("triton_mode")
def test_running_sum_does_not_cancel() -> None:
    # A large channel among small ones: float32 running sums would be off by ~15 % once it has
    # left the window (its square's rounding, 9e4 * 2^-24, against window sums of 3e-2).
    x = torch.full((1, 12, 1, 2), 0.1)
    x[0, 3] = 300.0
    expected = lrn_reference(x.double().numpy(), 3, 10.0, 0.75, 1e-2, "across")
    assert_close(local_response_norm(x, 3, 10.0, 0.75, 1e-2), expected, rtol=1e-6)


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_inputs_stay_in_their_windows(mode: str) -> None:
    x = torch.randn(1, 6, 5, 5, generator=torch.Generator().manual_seed(2))
    x[0, 2, 1, 1] = float("nan")
    x[0, 4, 3, 3] = float("inf")
    y = local_response_norm(x, 3, 1e-2, 0.75, 1.0, mode)
    expected = lrn_reference(x.double().numpy(), 3, 1e-2, 0.75, 1.0, mode)
    assert torch.equal(torch.isnan(y), torch.from_numpy(np.isnan(expected)))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(y.double().numpy()[finite], expected[finite], rtol=1e-6)


@pytest.mark.usefixtures("triton_mode")
def test_registered_operator_and_empty_batch() -> None:
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    y = torch.ops.lrnserve.local_response_norm(x, 3, 0.5, 0.75, 1.0, "within")
    assert_close(y, lrn_reference(x.double().numpy(), 3, 0.5, 0.75, 1.0, "within"), rtol=1e-6)
    assert local_response_norm(torch.empty(0, 3, 4, 4), 3).shape == (0, 3, 4, 4)


@pytest.mark.usefixtures("triton_mode")
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    size=st.integers(1, 9),
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
    assert_close(local_response_norm(x, size, alpha, beta, k, mode), expected, rtol=5e-6)


def test_cpu_tensors_skip_the_kernel_unless_asked(
    monkeypatch: pytest.MonkeyPatch, launches: list[tuple[int, ...]]
) -> None:
    x = torch.randn(1, 3, 4, 4)
    monkeypatch.delenv(triton_lrn.ENV, raising=False)
    local_response_norm(x, 3)
    monkeypatch.setenv(triton_lrn.ENV, "triton")
    local_response_norm(x.double(), 3)  # float64 and bfloat16 stay on the C++ kernel
    local_response_norm(x.bfloat16(), 3)
    assert launches == []


def test_missing_triton_raises_in_triton_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(triton_lrn.ENV, "triton")
    monkeypatch.setattr(triton_lrn, "load", lambda interpret: None)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="LRNSERVE_LRN_KERNEL=triton but the Triton kernel is unavailable"):
        local_response_norm(x, 3)
    with pytest.raises(RuntimeError, match="LRNSERVE_LRN_KERNEL=triton"):
        local_response_norm(x, 3, [0.1], 0.75, 1.0)  # the per-sample path too


def test_cuda_without_triton_falls_back_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(triton_lrn, "load", lambda interpret: None)
    monkeypatch.setattr(triton_lrn, "_loader", triton_lrn._Loader())
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # no GPU needed to decide
    with caplog.at_level(logging.WARNING, logger=triton_lrn.__name__):
        assert not triton_lrn.selected(cuda)  # type: ignore[arg-type]
        assert not triton_lrn.selected(cuda)  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if "Triton LRN kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert not triton_lrn.selected(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64))  # type: ignore[arg-type]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(mode: str, dtype: torch.dtype, launches: list[tuple[int, ...]]) -> None:
    x = (torch.randn(3, 10, 7, 9, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    for size, beta in ((5, 0.75), (4, 0.6), (40, 0.75)):
        y = local_response_norm(x.cuda(), size, 1e-3, beta, 1.0, mode)
        assert y.device.type == "cuda" and y.dtype == dtype
        expected = lrn_reference(x.double().numpy(), size, 1e-3, beta, 1.0, mode)
        assert_close(y.cpu(), expected, rtol=2e-6 if dtype == torch.float32 else 8e-3)
        per_sample = local_response_norm(x.cuda(), size, [1e-3, 0.5, 2.0], beta, 1.0, mode)
        for i, a in enumerate((1e-3, 0.5, 2.0)):
            single = lrn_reference(x[i : i + 1].double().numpy(), size, a, beta, 1.0, mode)
            assert_close(per_sample[i : i + 1].cpu(), single, rtol=2e-6 if dtype == torch.float32 else 8e-3)
    assert launches
