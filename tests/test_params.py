"""Other frameworks' LRN conventions, checked by evaluating their own formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrnserve.server.ops import LRNParams, local_response_norm


def apply(params: LRNParams, x: torch.Tensor) -> np.ndarray:
    p = params
    return local_response_norm(x, p.size, p.alpha, p.beta, p.k, p.mode).double().numpy()


def channel_window_sum(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """sum of x[:, c+lo .. c+hi]^2, clipped to the channel range."""
    total = np.zeros_like(x)
    for c in range(x.shape[1]):
        a, b = max(0, c + lo), min(x.shape[1] - 1, c + hi)
        total[:, c] = (x[:, a : b + 1] ** 2).sum(axis=1)
    return total


X = torch.randn(2, 11, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2


@pytest.mark.parametrize("radius", [0, 1, 2, 5])
def test_tensorflow(radius: int) -> None:
    # tf.nn.local_response_normalization: input / (bias + alpha * sum_{d-r}^{d+r} input^2) ** beta
    bias, alpha, beta = 1.5, 0.3, 0.6
    x = X.numpy()
    expected = x / (bias + alpha * channel_window_sum(x, -radius, radius)) ** beta
    params = LRNParams.from_tensorflow(depth_radius=radius, bias=bias, alpha=alpha, beta=beta)
    assert params.size == 2 * radius + 1
    np.testing.assert_allclose(apply(params, X), expected, rtol=1e-12)


def test_tensorflow_defaults() -> None:
    assert LRNParams.from_tensorflow() == LRNParams(11, 11.0, 0.5, 1.0, "across")


def test_alexnet_paper() -> None:
    # Krizhevsky et al.: b = a / (k + alpha * sum_{n/2 window} a^2) ** beta, alpha not divided by n.
    x = X.numpy()
    expected = x / (2.0 + 1e-4 * channel_window_sum(x, -2, 2)) ** 0.75
    params = LRNParams.from_alexnet_paper()
    assert params == LRNParams(5, 5e-4, 0.75, 2.0, "across")
    np.testing.assert_allclose(apply(params, X), expected, rtol=1e-12)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_onnx_and_pytorch(size: int) -> None:
    # ONNX LRN: square_sum over [c - floor((size-1)/2), c + ceil((size-1)/2)];
    # y = x / (bias + alpha / size * square_sum) ** beta. PyTorch's window is the same.
    x = X.numpy()
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    expected = x / (1.7 + 0.2 / size * channel_window_sum(x, -lo, hi)) ** 0.75
    onnx = LRNParams.from_onnx(size, alpha=0.2, beta=0.75, bias=1.7)
    assert onnx == LRNParams.from_pytorch(size, 0.2, 0.75, 1.7)
    if size % 2:  # odd: every convention agrees on the centred window
        np.testing.assert_allclose(apply(onnx, X), expected, rtol=1e-12)
    else:  # even: the ONNX spec's formula and PyTorch's window mirror each other
        torch_like = x / (1.7 + 0.2 / size * channel_window_sum(x, -(size // 2), (size - 1) // 2)) ** 0.75
        np.testing.assert_allclose(apply(onnx, X), torch_like, rtol=1e-12)
        np.testing.assert_allclose(apply(onnx, X.flip(1)), np.flip(expected, 1), rtol=1e-12)


def test_k_conventions() -> None:
    assert LRNParams.from_mxnet(5) == LRNParams(5, 1e-4, 0.75, 2.0)
    assert LRNParams.from_mxnet(3, 1e-3, 0.5, knorm=1.0) == LRNParams(3, 1e-3, 0.5, 1.0)
    assert LRNParams.from_cudnn() == LRNParams(5, 1e-4, 0.75, 2.0)
    assert LRNParams.from_cudnn(7, 2e-4, 0.7, 1.5) == LRNParams(7, 2e-4, 0.7, 1.5)


def test_caffe() -> None:
    assert LRNParams.from_caffe() == LRNParams(5, 1.0, 0.75, 1.0, "across")
    within = LRNParams.from_caffe(3, 5e-5, 0.75, norm_region="WITHIN_CHANNEL")
    assert within == LRNParams(3, 5e-5, 0.75, 1.0, "within")
    with pytest.raises(ValueError, match="norm_region must be ACROSS_CHANNELS or WITHIN_CHANNEL"):
        LRNParams.from_caffe(norm_region="SPATIAL")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be an integer >= 1"),
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"k": 0}, "k must be a finite number > 0"),
        ({"mode": "ACROSS"}, "mode must be one of"),
        ({"alpha": "1"}, "alpha must be a number"),
    ],
)
def test_params_validate(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LRNParams(**kwargs)  # type: ignore[arg-type]


def test_tensorflow_radius_validated() -> None:
    with pytest.raises(ValueError, match="depth_radius must be an integer >= 0"):
        LRNParams.from_tensorflow(depth_radius=-1)
