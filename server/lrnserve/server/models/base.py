"""What every classic LRN network shares: Caffe-style layers, weights, metadata."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..ops import LocalResponseNorm, LRNParams

logger = logging.getLogger(__name__)

LRNFactory = Callable[[LRNParams], nn.Module]
DEFAULT_SEED = 0


def caffe_max_pool(kernel: int, stride: int, padding: int = 0) -> nn.MaxPool2d:
    """Caffe's max pooling rounds output sizes up."""
    return nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)


def caffe_avg_pool(kernel: int, stride: int, padding: int = 0) -> nn.AvgPool2d:
    """Caffe's AVE pooling: ceil mode, divisor clipped at the bottom/right edge.

    With no padding, PyTorch's ceil-mode divisor (count_include_pad=True) is the
    window clipped to the input, exactly as Caffe divides.
    """
    return nn.AvgPool2d(kernel, stride, padding, ceil_mode=True, count_include_pad=True)


class LRNNetwork(nn.Module):
    """Base of the classic networks: NCHW images in, class probabilities out.

    Subclasses build ``self.features`` and ``self.classifier``; LRN layers are
    created through ``lrn_layer`` (lrnserve's LocalResponseNorm unless a
    benchmark swaps in another implementation).
    """

    name: str = ""
    input_shape: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000

    def __init__(self, lrn_layer: LRNFactory | None = None) -> None:
        super().__init__()
        self._lrn_layer: LRNFactory = lrn_layer or LocalResponseNorm.from_params
        self.weights_source = "uninitialised"

    def lrn(self, params: LRNParams) -> nn.Module:
        return self._lrn_layer(params)

    features: nn.Module
    classifier: nn.Module

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    def stages(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """``forward`` as steps a caller may stop between: each feature layer, then the
        classifier and softmax. Applied in order they compute exactly ``forward``."""
        if isinstance(self.features, nn.Sequential):
            yield from self.features.children()
        else:
            yield self.features
        yield self._head

    def forward_until(self, x: torch.Tensor, stop: Callable[[], bool] | None) -> torch.Tensor | None:
        """``forward``, giving up (None) between stages once ``stop()`` is true."""
        h = x
        for stage in self.stages():
            if stop is not None and stop():
                return None
            h = stage(h)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(torch.flatten(h, 1)), dim=1)

    def lrn_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, module) of every LRN layer, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, (LocalResponseNorm, nn.LocalResponseNorm)):
                yield name, module

    def init_seeded(self, seed: int = DEFAULT_SEED) -> None:
        """Deterministic random weights (PyTorch's default init under a fixed seed).

        The global RNG is left untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.reset_parameters()
        self.weights_source = f"seeded random (seed={seed})"

    def caffe_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(Caffe layer name, Conv2d or Linear) of every learned layer. Module leaf names are the BVLC
        prototxts' layer names; a network whose Caffe names are not valid module names overrides."""
        for qualified, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                yield qualified.rsplit(".", 1)[-1], module

    def load_weights(self, path: str | Path) -> None:
        """Load a PyTorch state dict (weights only, never pickled code) or a .safetensors file
        (a Caffe .caffemodel: ``importers.load_caffemodel``).

        Raises ValueError naming missing/unexpected keys or the first shape mismatch.
        """
        path = Path(path)
        if path.suffix.lower() == ".caffemodel":  # the importers read these (a layer above)
            raise ValueError(f"{path}: load a .caffemodel with lrnserve.server.importers.load_caffemodel")
        state = _read_state_dict(path)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match {self.name}: "
                f"missing keys {_preview(missing)}, unexpected keys {_preview(unexpected)}"
            )
        for key, tensor in own.items():
            given = state[key]
            if tuple(given.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{path}: weight {key!r} has shape {tuple(given.shape)}, {self.name} expects {tuple(tensor.shape)}"
                )
        self.load_state_dict(state, strict=True)
        self.weights_source = str(path)
        logger.info("%s: loaded weights from %s", self.name, path)


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
        return dict(load_file(str(path), device="cpu"))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(loaded)
