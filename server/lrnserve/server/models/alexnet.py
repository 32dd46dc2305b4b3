"""AlexNet (bvlc_alexnet) and CaffeNet (bvlc_reference_caffenet), as Caffe defines them.

Layer names follow the Caffe prototxts so converted weights map one to one.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..ops import LRNParams
from .base import LRNFactory, LRNNetwork, caffe_max_pool

# BVLC's released models: alpha 1e-4 divided by n, k 1 (not the paper's k 2).
ALEXNET_LRN = LRNParams(size=5, alpha=1e-4, beta=0.75, k=1.0, mode="across")


class AlexNet(LRNNetwork):
    """Input 3x227x227; conv1 → ReLU → LRN → pool, conv2 (group 2) → ReLU → LRN → pool, ..."""

    name = "alexnet"
    input_shape = (3, 227, 227)
    num_classes = 1000
    pool_before_norm = False

    def __init__(self, lrn_layer: LRNFactory | None = None, num_classes: int = 1000) -> None:
        super().__init__(lrn_layer)
        self.num_classes = num_classes
        stage1 = [("conv1", nn.Conv2d(3, 96, 11, stride=4)), ("relu1", nn.ReLU(inplace=True))]
        stage2 = [
            ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)),
            ("relu2", nn.ReLU(inplace=True)),
        ]
        layers = [*stage1, *self._norm_and_pool(1), *stage2, *self._norm_and_pool(2)]
        layers += [
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)),
            ("relu5", nn.ReLU(inplace=True)),
            ("pool5", caffe_max_pool(3, 2)),
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(0.5)),
                    ("fc7", nn.Linear(4096, 4096)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(0.5)),
                    ("fc8", nn.Linear(4096, num_classes)),
                ]
            )
        )

    def _norm_and_pool(self, index: int) -> list[tuple[str, nn.Module]]:
        norm = (f"norm{index}", self.lrn(ALEXNET_LRN))
        pool = (f"pool{index}", caffe_max_pool(3, 2))
        return [pool, norm] if self.pool_before_norm else [norm, pool]


class CaffeNet(AlexNet):
    """AlexNet with each pooling layer before its LRN (bvlc_reference_caffenet)."""

    name = "caffenet"
    pool_before_norm = True
