"""Model file importers: Caffe and ONNX files into the one model representation (``models.ir``).

One module per format (``caffe``, ``onnx``); both produce an ``ir.Graph``, which
``models.runtime.GraphNetwork`` runs and ``export_onnx`` writes as ONNX. Every failure is an
``ir.ModelLoadError`` whose one-line message names the file and the layer or node.
"""

from __future__ import annotations

from pathlib import Path

from ..models import DEFAULT_SEED, LRNNetwork, create_network
from ..models.ir import Graph, ModelLoadError


def read_caffe(prototxt: Path, weights: Path | None = None, *, seed: int = 0) -> Graph:
    """A Caffe net: its prototxt and, optionally, trained weights (else seeded random ones)."""
    from .caffe import read_net

    return read_net(prototxt, weights, seed=seed)


def read_onnx(path: Path) -> Graph:
    from .onnx import read_model

    return read_model(path)


def load_caffemodel(network: LRNNetwork, path: Path) -> None:
    """A built-in network's weights from a .caffemodel, its layers matched by Caffe name."""
    from .caffe import load_into

    load_into(network, path)


def built_in_network(name: str, weights: Path | None = None, *, seed: int = DEFAULT_SEED) -> LRNNetwork:
    """``models.create_network`` that also takes a .caffemodel as ``weights``."""
    if weights is None or weights.suffix.lower() != ".caffemodel":
        return create_network(name, weights=weights, seed=seed)
    network = create_network(name, seed=seed)
    load_caffemodel(network, weights)
    return network


def read_file(path: Path, *, prototxt: Path | None = None) -> Graph:
    """Whatever ``path`` is, by its suffix: ``.onnx``; a ``.prototxt`` (random weights); a
    ``.caffemodel`` with the ``prototxt`` that defines its net."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return read_onnx(path)
    if suffix == ".caffemodel":
        if prototxt is None:
            raise ModelLoadError(f"{path}: a caffemodel holds weights only; give its net's prototxt too")
        return read_caffe(prototxt, path)
    if suffix in (".prototxt", ".pbtxt", ".txt"):
        return read_caffe(path)
    raise ModelLoadError(
        f"{path}: unknown model file type {suffix or '(none)'}; expected .onnx, .prototxt or .caffemodel"
    )


__all__ = ["Graph", "ModelLoadError", "built_in_network", "load_caffemodel", "read_caffe", "read_file", "read_onnx"]
