"""Caffe's input preprocessing, done by the server for a whole batch on the model's device.

A model with a ``[models.NAME.preprocess]`` table (``settings.Preprocess``) takes what the
client has (uint8 images, NHWC, RGB) and turns it into what the Caffe model was trained on,
in the order of Caffe's ``caffe.io.Transformer.preprocess``:

1. cast to float (Caffe: ``astype(float32)``; here float32, or float64 for a float64 model),
2. HWC -> CHW (``layout = "nhwc"``; Caffe's ``set_transpose``),
3. RGB -> BGR (``channel_order = "rgb"``; Caffe's ``set_channel_swap((2, 1, 0))``),
4. x ``raw_scale``, 5. - ``mean``, 6. x ``scale`` (Caffe's ``input_scale``).

Caffe also resizes; lrnserve does not: the client sends the model's input size. Each step is
one torch op over the whole batch (run inside the batch, not per request in Python); the
model's own dtype cast follows. The mean image is read, checked and centre-cropped once, at load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .importers.caffe_blobs import read_blob
from .models.ir import ModelLoadError
from .settings import Preprocess


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def load_mean(spec: Preprocess, model: str, sample_shape: tuple[int, ...]) -> np.ndarray | None:
    """The mean to subtract, broadcastable over one CHW sample: C x 1 x 1 from values, C x H x W
    from a file (centre-cropped to the input as Caffe crops it: offsets floor((M - H) / 2)).
    A mean that does not fit the input is a one-line ``ModelLoadError`` naming both shapes."""
    channels, height, width = sample_shape
    if spec.mean is None:
        return None
    if not isinstance(spec.mean, Path):
        if len(spec.mean) != channels:
            raise ModelLoadError(
                f"models.{model}.preprocess.mean: {len(spec.mean)} values for the input's {channels} channels "
                f"(input {_shape_text(sample_shape)})"
            )
        return np.asarray(spec.mean, dtype=np.float64).reshape(channels, 1, 1)
    mean = read_blob(spec.mean)
    while mean.ndim > 3 and mean.shape[0] == 1:  # a legacy mean file is 1 x C x H x W
        mean = mean[0]
    fits = mean.ndim == 3 and mean.shape[0] == channels
    if fits and spec.crop == "center":
        fits = mean.shape[1] >= height and mean.shape[2] >= width
    elif fits:
        fits = mean.shape[1:] == (height, width)
    if not fits:
        how = "centre-cropped to" if spec.crop == "center" else "equal to (crop = none)"
        raise ModelLoadError(
            f"{spec.mean}: mean image of shape {_shape_text(mean.shape)} does not fit model '{model}''s input "
            f"{_shape_text(sample_shape)}; it must have {channels} channels and be {how} {height}x{width}"
        )
    top, left = (mean.shape[1] - height) // 2, (mean.shape[2] - width) // 2
    return np.ascontiguousarray(mean[:, top : top + height, left : left + width], dtype=np.float64)


class Preprocessor:
    """One model's preprocessing: what the client sends, and the batch op that makes it the model's input."""

    def __init__(self, spec: Preprocess, model: str, sample_shape: tuple[int, ...]) -> None:
        if len(sample_shape) != 3:
            raise ModelLoadError(
                f"models.{model}.preprocess: needs an image input (C x H x W), the model takes "
                f"{_shape_text(sample_shape)}"
            )
        if spec.channel_order == "rgb" and sample_shape[0] != 3:
            raise ModelLoadError(
                f"models.{model}.preprocess.channel_order: rgb needs 3 channels, the model's input is "
                f"{_shape_text(sample_shape)}"
            )
        self.spec = spec
        channels, height, width = sample_shape
        self.nhwc = spec.layout == "nhwc"
        self.layout = "NHWC" if self.nhwc else "NCHW"
        self.client_sample_shape = (height, width, channels) if self.nhwc else sample_shape
        self.uint8 = spec.input_datatype == "uint8"
        self._mean_values = load_mean(spec, model, sample_shape)
        self._mean: torch.Tensor | None = None
        self._compute = torch.float32

    @property
    def description(self) -> str:
        """One line for the load log: what is sent, and each step taken."""
        spec = self.spec
        steps = [f"{'UINT8 or ' if self.uint8 else ''}float {self.layout}"]
        steps += ["RGB -> BGR"] if spec.channel_order == "rgb" else []
        steps += [f"x {spec.raw_scale:g}"] if spec.raw_scale != 1.0 else []
        if self._mean_values is not None:
            steps.append(f"- mean {_shape_text(self._mean_values.shape)}")
        steps += [f"x {spec.scale:g}"] if spec.scale != 1.0 else []
        return ", ".join(steps)

    def to(self, device: torch.device, model_dtype: torch.dtype) -> None:
        """Put the mean on ``device``; compute in float32 (float64 for a float64 model), as Caffe does,
        so that a half-precision model gets exact 0-255 arithmetic before its own cast."""
        self._compute = torch.float64 if model_dtype == torch.float64 else torch.float32
        if self._mean_values is not None:
            self._mean = torch.from_numpy(self._mean_values).to(device=device, dtype=self._compute)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the client sent it (N x H x W x C or N x C x H x W, uint8 or float), in the
        model's layout, channel order and value range (float32/float64, contiguous)."""
        x = x.to(self._compute)
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        if self.spec.channel_order == "rgb":
            x = x.flip(1)
        if self.spec.raw_scale != 1.0:
            x = x * self.spec.raw_scale
        if self._mean is not None:
            x = x - self._mean
        if self.spec.scale != 1.0:
            x = x * self.spec.scale
        return x.contiguous()
