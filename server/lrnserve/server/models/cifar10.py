"""Caffe's cifar10_full example: the classic WITHIN_CHANNEL LRN network."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..ops import LRNParams
from .base import LRNFactory, LRNNetwork, caffe_avg_pool, caffe_max_pool

CIFAR10_LRN = LRNParams(size=3, alpha=5e-5, beta=0.75, k=1.0, mode="within")


class Cifar10Full(LRNNetwork):
    """Input 3x32x32: conv1, max pool, ReLU, LRN; conv2, ReLU, avg pool, LRN; conv3, ReLU, avg pool; fc."""

    name = "cifar10_full"
    input_shape = (3, 32, 32)
    num_classes = 10

    def __init__(self, lrn_layer: LRNFactory | None = None, num_classes: int = 10) -> None:
        super().__init__(lrn_layer)
        self.num_classes = num_classes
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 32, 5, padding=2)),
                    ("pool1", caffe_max_pool(3, 2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", self.lrn(CIFAR10_LRN)),
                    ("conv2", nn.Conv2d(32, 32, 5, padding=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("pool2", caffe_avg_pool(3, 2)),
                    ("norm2", self.lrn(CIFAR10_LRN)),
                    ("conv3", nn.Conv2d(32, 64, 5, padding=2)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("pool3", caffe_avg_pool(3, 2)),
                ]
            )
        )
        self.classifier = nn.Sequential(OrderedDict([("ip1", nn.Linear(64 * 4 * 4, num_classes))]))
