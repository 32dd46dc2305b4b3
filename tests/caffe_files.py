"""Caffe files for the importer's tests, and a Caffe forward pass written from Caffe's definitions.

Files are built with the project's own ``caffe_pb2`` messages: caffemodels in the current
``layer`` format or the legacy V1 ``layers`` format (legacy blobs carry a 4-D
num/channels/height/width shape: a bias is 1x1x1xN), mean files, prototxt text. A blob's values
are loaded into its message by parsing their packed wire encoding, which protobuf does at C
speed (``extend`` costs seconds for AlexNet's 61M weights).

``caffe_forward`` is the reference the importer is checked against. It reads the net message
itself and follows Caffe's layer code (pooling_layer.cpp's output size and AVE divisor, lrn_layer
.cpp's two regions, batch_norm/scale), using torch only for convolution. It calls no lrnserve code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from lrnserve.server.importers.pb import caffe_pb2

Weights = dict[str, list[np.ndarray]]
V1_NAMES = {
    "Convolution": "CONVOLUTION", "Pooling": "POOLING", "LRN": "LRN", "ReLU": "RELU", "Sigmoid": "SIGMOID",
    "TanH": "TANH", "Dropout": "DROPOUT", "Softmax": "SOFTMAX", "Concat": "CONCAT", "Flatten": "FLATTEN",
    "InnerProduct": "INNER_PRODUCT", "Eltwise": "ELTWISE", "Split": "SPLIT", "Data": "DATA",
    "SoftmaxWithLoss": "SOFTMAX_LOSS", "Accuracy": "ACCURACY",
}  # fmt: skip
V2_NAMES = {v1: v2 for v2, v1 in V1_NAMES.items()}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, or a packed repeated number field) on the wire."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def blob_bytes(array: np.ndarray, *, legacy: bool = False, double: bool = False) -> bytes:
    """A serialized BlobProto of ``array``: ``shape``, or the legacy 4-D num/channels/height/width."""
    array = np.asarray(array)
    meta = caffe_pb2.BlobProto()
    if legacy:
        meta.num, meta.channels, meta.height, meta.width = (1,) * (4 - array.ndim) + array.shape
    else:
        meta.shape.dim.extend(array.shape)
    data = array.astype("<f8" if double else "<f4").tobytes()
    return meta.SerializeToString() + length_delimited(8 if double else 5, data)


def blob_proto(array: np.ndarray, *, legacy: bool = False, double: bool = False) -> caffe_pb2.BlobProto:
    return caffe_pb2.BlobProto.FromString(blob_bytes(array, legacy=legacy, double=double))


def caffemodel_bytes(
    weights: Mapping[str, Sequence[np.ndarray]],
    types: Mapping[str, str] | None = None,
    *,
    v1: bool = False,
    legacy: bool | None = None,
) -> bytes:
    """A NetParameter holding ``weights`` by layer name (V1: ``layers`` with enum types and,
    unless told otherwise, legacy 4-D blob shapes). Each layer's message is caffe_pb2's; its
    blobs are appended as fields (``test_the_fast_writer_writes_what_protobuf_writes``)."""
    legacy = v1 if legacy is None else legacy
    parts = [caffe_pb2.NetParameter(name="written by the tests").SerializeToString()]
    for name, arrays in weights.items():
        kind = (types or {}).get(name, "Convolution")
        layer: caffe_pb2.V1LayerParameter | caffe_pb2.LayerParameter
        if v1:
            layer = caffe_pb2.V1LayerParameter(
                name=name, type=caffe_pb2.V1LayerParameter.LayerType.Value(V1_NAMES[kind])
            )
        else:
            layer = caffe_pb2.LayerParameter(name=name, type=kind)
        blobs = b"".join(length_delimited(6 if v1 else 7, blob_bytes(array, legacy=legacy)) for array in arrays)
        parts.append(length_delimited(2 if v1 else 100, layer.SerializeToString() + blobs))
    return b"".join(parts)


def write_caffemodel(path: Path, weights: Mapping[str, Sequence[np.ndarray]], **options: object) -> Path:
    path.write_bytes(caffemodel_bytes(weights, **options))
    return path


def write_mean(path: Path, mean: np.ndarray, *, legacy: bool = True, double: bool = False) -> Path:
    path.write_bytes(blob_proto(mean, legacy=legacy, double=double).SerializeToString())
    return path


def parse_net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter(), allow_unknown_field=True)


def layer_types(net: caffe_pb2.NetParameter) -> dict[str, str]:
    """Layer name -> current type name, for writing a caffemodel of ``net``'s layers."""
    found = {layer.name: layer.type for layer in net.layer}
    for layer in net.layers:
        found[layer.name] = V2_NAMES[caffe_pb2.V1LayerParameter.LayerType.Name(layer.type)]
    return found


# The reference forward pass ------------------------------------------------------------------


def _pool_size(size: int, kernel: int, stride: int, pad: int, ceil: bool, any_pad: bool) -> int:
    """pooling_layer.cpp: static_cast<int>(ceil(float(size + 2 * pad - kernel) / stride)) + 1,
    then one less if padded and the last window would start in the padding."""
    rounded = math.ceil if ceil else math.floor
    out = int(rounded((size + 2 * pad - kernel) / stride)) + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def reference_pool(x: np.ndarray, p: caffe_pb2.PoolingParameter) -> np.ndarray:
    n, c, height, width = x.shape
    if p.global_pooling:
        kh, kw = height, width
    elif p.HasField("kernel_h"):
        kh, kw = p.kernel_h, p.kernel_w
    else:
        kh = kw = p.kernel_size
    ph, pw = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
    sh, sw = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
    ceil = p.round_mode == caffe_pb2.PoolingParameter.CEIL
    oh = _pool_size(height, kh, sh, ph, ceil, bool(ph or pw))
    ow = _pool_size(width, kw, sw, pw, ceil, bool(ph or pw))
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hstart, wstart = i * sh - ph, j * sw - pw
            hend, wend = min(hstart + kh, height + ph), min(wstart + kw, width + pw)
            pool_size = (hend - hstart) * (wend - wstart)  # the window clipped to the padded extent
            window = x[:, :, max(hstart, 0) : min(hend, height), max(wstart, 0) : min(wend, width)]
            if p.pool == caffe_pb2.PoolingParameter.MAX:
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                out[:, :, i, j] = window.sum(axis=(2, 3)) / pool_size
    return out


def reference_lrn(x: np.ndarray, p: caffe_pb2.LRNParameter) -> np.ndarray:
    size, alpha, beta = p.local_size, float(p.alpha), float(p.beta)
    half = (size - 1) // 2
    squares = x**2
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        channels = x.shape[1]
        scale = np.empty_like(x)
        for c in range(channels):
            lo, hi = max(0, c - half), min(channels, c + half + 1)
            scale[:, c] = float(p.k) + alpha / size * squares[:, lo:hi].sum(axis=1)
        return x * scale**-beta
    # WITHIN_CHANNEL: an AVE pool of x^2 (kernel size, pad half, divisor size^2), then a power
    # layer with shift 1 (the file's k is not used), scale alpha and power -beta.
    height, width = x.shape[2:]
    padded = np.pad(squares, ((0, 0), (0, 0), (half, half), (half, half)))
    total = sum(padded[:, :, dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size))
    return x * (1.0 + alpha * total / size**2) ** -beta


def _conv_geometry(p: caffe_pb2.ConvolutionParameter) -> tuple[tuple[int, int], ...]:
    def pick(values: Sequence[int], h: str, w: str, default: int) -> tuple[int, int]:
        if h and p.HasField(h):
            return (getattr(p, h), getattr(p, w))
        if not values:
            return (default, default)
        return (values[0], values[-1])

    kernel = pick(p.kernel_size, "kernel_h", "kernel_w", 0)
    return (
        kernel,
        pick(p.stride, "stride_h", "stride_w", 1),
        pick(p.pad, "pad_h", "pad_w", 0),
        pick(p.dilation, "", "", 1),
    )


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], bound: float) -> np.ndarray:
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _make_blobs(
    kind: str, layer: caffe_pb2.LayerParameter, x: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Random weights of Caffe's shapes, scaled (He-uniform) so activations keep their size."""
    if kind == "Convolution":
        p = layer.convolution_param
        (kh, kw), *_ = _conv_geometry(p)
        fan_in = x.shape[1] // p.group * kh * kw
        blobs = [_uniform(rng, (p.num_output, x.shape[1] // p.group, kh, kw), math.sqrt(6 / fan_in))]
        return blobs + ([_uniform(rng, (p.num_output,), 0.5)] if p.bias_term else [])
    if kind == "InnerProduct":
        p = layer.inner_product_param
        fan_in = math.prod(x.shape[p.axis :])
        shape = (fan_in, p.num_output) if p.transpose else (p.num_output, fan_in)
        return [_uniform(rng, shape, math.sqrt(6 / fan_in))] + (
            [_uniform(rng, (p.num_output,), 0.5)] if p.bias_term else []
        )
    if kind == "BatchNorm":
        c = x.shape[1]
        factor = np.array([rng.choice([0.5, 2.0, 0.0 if c == 3 else 4.0])], np.float32)
        return [_uniform(rng, (c,), 1.0), rng.uniform(0.5, 2.0, c).astype(np.float32), factor]
    if kind == "Scale":
        p = layer.scale_param
        shape = x.shape[p.axis :] if p.num_axes == -1 else x.shape[p.axis : p.axis + p.num_axes]
        return [rng.uniform(0.5, 1.5, shape).astype(np.float32)] + ([_uniform(rng, shape, 0.5)] if p.bias_term else [])
    return []


def _phase_ok(layer: caffe_pb2.LayerParameter) -> bool:
    test = caffe_pb2.TEST
    if layer.include:
        return any(not rule.HasField("phase") or rule.phase == test for rule in layer.include)
    return not any(not rule.HasField("phase") or rule.phase == test for rule in layer.exclude)


def caffe_forward(
    net: caffe_pb2.NetParameter, x: np.ndarray, weights: Weights | None = None, seed: int = 0
) -> tuple[dict[str, np.ndarray], Weights]:
    """Every blob's final value (float64) for input ``x``, and the weights used: ``weights``'
    where given, else made up (seeded) and returned for writing a caffemodel."""
    rng = np.random.default_rng(seed)
    used: Weights = {}
    given = weights or {}
    blobs: dict[str, np.ndarray] = {}
    first_input = list(net.input) or [lay.top[0] for lay in net.layer if lay.type == "Input"]
    blobs[first_input[0]] = x.astype(np.float64)
    layers = [(lay.type, lay) for lay in net.layer] + [
        (V2_NAMES[caffe_pb2.V1LayerParameter.LayerType.Name(lay.type)], lay) for lay in net.layers
    ]
    for kind, layer in layers:
        if kind in ("Input", "Accuracy") or kind.endswith("Loss") or not _phase_ok(layer):
            continue
        bottoms = [blobs[name] for name in layer.bottom]
        if kind in ("Convolution", "InnerProduct", "BatchNorm", "Scale"):
            if layer.name not in given:
                given = {**given, layer.name: _make_blobs(kind, layer, bottoms[0], rng)}
            used[layer.name] = given[layer.name]
        params = [b.astype(np.float64) for b in used.get(layer.name, [])]
        out = _forward(kind, layer, bottoms, params)
        for top in layer.top:
            blobs[top] = out
    return blobs, used


def _forward(
    kind: str, layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], params: list[np.ndarray]
) -> np.ndarray:
    x = bottoms[0]
    if kind == "Convolution":
        p = layer.convolution_param
        _, stride, pad, dilation = _conv_geometry(p)
        bias = torch.from_numpy(params[1]) if len(params) > 1 else None
        return F.conv2d(torch.from_numpy(x), torch.from_numpy(params[0]), bias, stride, pad, dilation, p.group).numpy()
    if kind == "Pooling":
        return reference_pool(x, layer.pooling_param)
    if kind == "LRN":
        return reference_lrn(x, layer.lrn_param)
    if kind == "ReLU":
        return np.where(x > 0, x, x * float(layer.relu_param.negative_slope))
    if kind == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if kind == "TanH":
        return np.tanh(x)
    if kind in ("Dropout", "Split"):
        return x
    if kind == "Softmax":
        e = np.exp(x - x.max(axis=layer.softmax_param.axis, keepdims=True))
        return e / e.sum(axis=layer.softmax_param.axis, keepdims=True)
    if kind == "Concat":
        p = layer.concat_param
        return np.concatenate(bottoms, axis=p.concat_dim if p.HasField("concat_dim") else p.axis)
    if kind == "Flatten":
        p = getattr(layer, "flatten_param", caffe_pb2.FlattenParameter())
        end = p.end_axis % x.ndim
        return x.reshape(*x.shape[: p.axis], -1, *x.shape[end + 1 :])
    if kind == "InnerProduct":
        p = layer.inner_product_param
        flat = x.reshape(math.prod(x.shape[: p.axis]), -1)
        y = flat @ (params[0] if p.transpose else params[0].T) + (params[1] if len(params) > 1 else 0.0)
        return y.reshape(*x.shape[: p.axis], -1)
    if kind == "Eltwise":
        p = layer.eltwise_param
        if p.operation == caffe_pb2.EltwiseParameter.PROD:
            return np.prod(bottoms, axis=0)
        if p.operation == caffe_pb2.EltwiseParameter.MAX:
            return np.max(bottoms, axis=0)
        coeff = list(p.coeff) or [1.0] * len(bottoms)
        return sum(c * b for c, b in zip(coeff, bottoms, strict=True))
    if kind == "BatchNorm":
        factor = 0.0 if params[2][0] == 0 else 1.0 / params[2][0]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean, var = (params[0] * factor).reshape(shape), (params[1] * factor).reshape(shape)
        return (x - mean) / np.sqrt(var + float(layer.batch_norm_param.eps))
    if kind == "Scale":
        p = layer.scale_param
        scale = bottoms[1] if len(bottoms) > 1 else params[0]
        trailing = (1,) * (x.ndim - p.axis - scale.ndim)  # aligns the scale with x's dims from axis
        y = x * scale.reshape(scale.shape + trailing)
        return y + params[-1].reshape(scale.shape + trailing) if p.bias_term else y
    raise AssertionError(f"the reference has no {kind}")
