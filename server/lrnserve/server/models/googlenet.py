"""GoogLeNet (bvlc_googlenet) as Caffe defines it: LRN after the stem's first two stages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from ..ops import LRNParams
from .base import LRNFactory, LRNNetwork, caffe_avg_pool, caffe_max_pool

GOOGLENET_LRN = LRNParams(size=5, alpha=1e-4, beta=0.75, k=1.0, mode="across")

# name: (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) — from the Caffe prototxt.
INCEPTION = {
    "inception_3a": (192, 64, 96, 128, 16, 32, 32),
    "inception_3b": (256, 128, 128, 192, 32, 96, 64),
    "inception_4a": (480, 192, 96, 208, 16, 48, 64),
    "inception_4b": (512, 160, 112, 224, 24, 64, 64),
    "inception_4c": (512, 128, 128, 256, 24, 64, 64),
    "inception_4d": (512, 112, 144, 288, 32, 64, 64),
    "inception_4e": (528, 256, 160, 320, 32, 128, 128),
    "inception_5a": (832, 256, 160, 320, 32, 128, 128),
    "inception_5b": (832, 384, 192, 384, 48, 128, 128),
}


def _conv_relu(cin: int, cout: int, kernel: int, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1→3x3 | 1x1→5x5 | maxpool→1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branch_1x1 = _conv_relu(cin, c1, 1)
        self.branch_3x3 = nn.Sequential(_conv_relu(cin, c3r, 1), _conv_relu(c3r, c3, 3, padding=1))
        self.branch_5x5 = nn.Sequential(_conv_relu(cin, c5r, 1), _conv_relu(c5r, c5, 5, padding=2))
        self.branch_pool = nn.Sequential(caffe_max_pool(3, 1, padding=1), _conv_relu(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch_1x1, self.branch_3x3, self.branch_5x5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


class GoogLeNet(LRNNetwork):
    """Input 3x224x224; the 22-layer Inception v1 network without its auxiliary heads."""

    name = "googlenet"
    input_shape = (3, 224, 224)
    num_classes = 1000

    def __init__(self, lrn_layer: LRNFactory | None = None, num_classes: int = 1000) -> None:
        super().__init__(lrn_layer)
        self.num_classes = num_classes
        layers: list[tuple[str, nn.Module]] = [
            ("conv1_7x7_s2", nn.Conv2d(3, 64, 7, stride=2, padding=3)),
            ("conv1_relu", nn.ReLU(inplace=True)),
            ("pool1_3x3_s2", caffe_max_pool(3, 2)),
            ("pool1_norm1", self.lrn(GOOGLENET_LRN)),
            ("conv2_3x3_reduce", nn.Conv2d(64, 64, 1)),
            ("conv2_relu_reduce", nn.ReLU(inplace=True)),
            ("conv2_3x3", nn.Conv2d(64, 192, 3, padding=1)),
            ("conv2_relu", nn.ReLU(inplace=True)),
            ("conv2_norm2", self.lrn(GOOGLENET_LRN)),
            ("pool2_3x3_s2", caffe_max_pool(3, 2)),
        ]
        for name, spec in INCEPTION.items():
            layers.append((name, Inception(*spec)))
            if name in ("inception_3b", "inception_4e"):
                layers.append((f"pool{name[-2]}_3x3_s2", caffe_max_pool(3, 2)))
        layers += [("pool5_7x7_s1", caffe_avg_pool(7, 1)), ("pool5_drop", nn.Dropout(0.4))]
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Sequential(OrderedDict([("loss3_classifier", nn.Linear(1024, num_classes))]))

    def caffe_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """The BVLC prototxt's names ("conv1/7x7_s2", "inception_3a/3x3_reduce", ...), which
        contain slashes, so the modules cannot carry them."""
        paths = {"conv1/7x7_s2": "features.conv1_7x7_s2", "conv2/3x3_reduce": "features.conv2_3x3_reduce"}
        paths["conv2/3x3"] = "features.conv2_3x3"
        for name in INCEPTION:
            for caffe_name, branch in [
                ("1x1", "branch_1x1.0"),
                ("3x3_reduce", "branch_3x3.0.0"),
                ("3x3", "branch_3x3.1.0"),
                ("5x5_reduce", "branch_5x5.0.0"),
                ("5x5", "branch_5x5.1.0"),
                ("pool_proj", "branch_pool.1.0"),
            ]:
                paths[f"{name}/{caffe_name}"] = f"features.{name}.{branch}"
        paths["loss3/classifier"] = "classifier.loss3_classifier"
        for caffe_name, path in paths.items():
            yield caffe_name, self.get_submodule(path)
