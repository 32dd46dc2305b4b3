"""ZFNet-512 as in the ONNX model zoo: AlexNet-like with LRN k = 2."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..ops import LRNParams
from .base import LRNFactory, LRNNetwork, caffe_max_pool

ZFNET_LRN = LRNParams(size=5, alpha=5e-4, beta=0.75, k=2.0, mode="across")


class ZFNet512(LRNNetwork):
    """Input 3x224x224; conv1 7/2 → ReLU → LRN → pool, conv2 5/2 → ReLU → LRN → pool,
    conv3-5 512 → pool 2/2, fc6 4096 → fc7 1024 → fc8 classes."""

    name = "zfnet512"
    input_shape = (3, 224, 224)
    num_classes = 1000

    def __init__(self, lrn_layer: LRNFactory | None = None, num_classes: int = 1000) -> None:
        super().__init__(lrn_layer)
        self.num_classes = num_classes
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 96, 7, stride=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", self.lrn(ZFNET_LRN)),
                    ("pool1", caffe_max_pool(3, 2)),
                    ("conv2", nn.Conv2d(96, 256, 5, stride=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", self.lrn(ZFNET_LRN)),
                    ("pool2", caffe_max_pool(3, 2)),
                    ("conv3", nn.Conv2d(256, 512, 3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(512, 512, 3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(512, 512, 3, padding=1)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", caffe_max_pool(2, 2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(512 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(0.5)),
                    ("fc7", nn.Linear(4096, 1024)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(0.5)),
                    ("fc8", nn.Linear(1024, num_classes)),
                ]
            )
        )
