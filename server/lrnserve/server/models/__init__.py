"""The classic LRN networks, built as Caffe defines them (docs/lrn.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from .alexnet import AlexNet, CaffeNet
from .base import DEFAULT_SEED, LRNFactory, LRNNetwork, caffe_avg_pool, caffe_max_pool
from .cifar10 import Cifar10Full
from .googlenet import GoogLeNet
from .zfnet import ZFNet512

NETWORKS: dict[str, type[LRNNetwork]] = {cls.name: cls for cls in (AlexNet, CaffeNet, GoogLeNet, Cifar10Full, ZFNet512)}


def create_network(
    name: str,
    *,
    weights: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    lrn_layer: LRNFactory | None = None,
) -> LRNNetwork:
    """Build network ``name`` in eval mode, with weights from ``weights`` or seeded random ones."""
    try:
        cls = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(sorted(NETWORKS))}") from None
    with torch.random.fork_rng(devices=[]):  # construction draws random numbers too
        network = cls(lrn_layer=lrn_layer)
    network.init_seeded(seed)
    if weights is not None:
        network.load_weights(weights)
    return network.eval()


__all__ = [
    "DEFAULT_SEED",
    "NETWORKS",
    "AlexNet",
    "CaffeNet",
    "Cifar10Full",
    "GoogLeNet",
    "LRNFactory",
    "LRNNetwork",
    "ZFNet512",
    "caffe_avg_pool",
    "caffe_max_pool",
    "create_network",
]
