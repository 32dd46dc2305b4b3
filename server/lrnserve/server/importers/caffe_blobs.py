"""Caffe's binary files: caffemodels (a NetParameter of layers with blobs) and BlobProto files.

A caffemodel is mostly float data (AlexNet: 61M values, 233 MB). Decoding it with protobuf and
reading each value through the message costs seconds, so the two outer levels of the message
(the net's layers, a layer's blobs, a blob's packed data) are walked here by their wire framing,
and the values are read by numpy straight from the file's bytes. Everything else (names,
shapes, legacy dims) is decoded by protobuf from the small remainder of each message. Shapes are
compared the way Caffe's ``Blob::ShapeEquals`` compares them; errors are one line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from ..models import ir
from .caffe_layers import BlobSpec, Partial, Shape, show
from .pb import caffe_pb2


def load_error(where: str | Path, message: str) -> ir.ModelLoadError:
    return ir.ModelLoadError(re.sub(r"\s*[\r\n]+\s*", " ", f"{where}: {message}"))


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise load_error(path, "no such file") from None
    except OSError as exc:
        raise load_error(path, f"cannot read it: {exc.strerror or ir.first_line(exc)}") from None


class _Corrupt(Exception):
    """The bytes are not a well-formed protobuf message."""


def _varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        if pos >= end:
            raise _Corrupt("truncated")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise _Corrupt("an overlong varint")


def _fields(raw: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, key offset, value offset, end offset) of each field."""
    pos = start
    while pos < end:
        key_at = pos
        key, pos = _varint(raw, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            after = _varint(raw, pos, end)[1]
        elif wire == 2:
            length, pos = _varint(raw, pos, end)
            after = pos + length
        elif wire in (1, 5):
            after = pos + (8 if wire == 1 else 4)
        else:
            raise _Corrupt(f"wire type {wire}")
        if number == 0 or after > end:
            raise _Corrupt("truncated" if after > end else "field number 0")
        yield number, wire, key_at, pos, after
        pos = after


def _parse(message: Message, data: bytes) -> None:
    try:
        message.ParseFromString(data)
    except Exception as exc:  # DecodeError, or RecursionError from hostile nesting
        raise _Corrupt(ir.first_line(exc)) from None


def _blob(raw: bytes, start: int, end: int, where: str) -> np.ndarray:
    """The BlobProto in raw[start:end] as float32, in its shape: ``shape``, else the legacy
    num/channels/height/width (Blob::FromProto)."""
    rest = bytearray()
    chunks: dict[int, list[np.ndarray]] = {5: [], 8: []}  # data, double_data
    for number, wire, key_at, at, after in _fields(raw, start, end):
        if number in (6, 9):  # diff, double_diff: gradients, not needed
            continue
        if number in chunks and wire == 2:
            size = 4 if number == 5 else 8
            if (after - at) % size:
                raise _Corrupt("a packed field of partial values")
            chunks[number].append(np.frombuffer(raw, "<f4" if size == 4 else "<f8", (after - at) // size, at))
        else:
            rest += raw[key_at:after]
    meta = caffe_pb2.BlobProto()
    _parse(meta, bytes(rest))
    if meta.data or meta.double_data:  # values written unpacked: let protobuf decode the whole blob
        _parse(meta, raw[start:end])
        chunks = {5: [np.fromiter(meta.data, np.float32)], 8: [np.fromiter(meta.double_data, np.float64)]}
    doubles, floats = [c for c in chunks[8] if c.size], [c for c in chunks[5] if c.size]
    values = np.concatenate(doubles or floats or [np.zeros(0, np.float32)]).astype(
        np.float32
    )  # doubles first, as Caffe
    if meta.HasField("shape"):
        shape: Shape = tuple(int(d) for d in meta.shape.dim)
    elif any(meta.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (meta.num, meta.channels, meta.height, meta.width)
    else:
        shape = ()
    if len(shape) > 32 or any(d < 0 for d in shape):
        raise load_error(where, f"has an invalid shape {show(shape[:8])}")
    if math.prod(shape) != values.size:
        raise load_error(where, f"holds {values.size} values, but its shape {show(shape)} needs {math.prod(shape)}")
    return values.reshape(shape)


def _unreadable(path: Path, what: str, exc: Exception) -> ir.ModelLoadError:
    return load_error(path, f"not a readable {what}: corrupt, truncated or another format ({ir.first_line(exc)})")


def read_blob(path: Path) -> np.ndarray:
    """A BlobProto file (a mean ``.binaryproto``) as float32 in the file's shape (a legacy mean
    file is 1 x C x H x W)."""
    path = Path(path)
    raw = read_file(path)
    try:
        array = _blob(raw, 0, len(raw), str(path))
    except _Corrupt as exc:
        raise _unreadable(path, "BlobProto (.binaryproto)", exc) from None
    if not array.size:
        raise load_error(path, "holds no values (not a BlobProto .binaryproto file?)")
    return array


def read_caffemodel(path: Path) -> dict[str, list[np.ndarray]]:
    """The learned blobs of each layer of a caffemodel (``layer`` or legacy V1 ``layers``), by
    layer name, in the file's shapes. A later layer of the same name replaces an earlier one, as
    in Caffe's copy, unless it has no blobs."""
    path = Path(path)
    raw = read_file(path)
    found: dict[str, list[np.ndarray]] = {}
    layers = 0
    try:
        for number, wire, _, at, after in _fields(raw, 0, len(raw)):
            if wire != 2 or number not in (2, 100):  # NetParameter.layers (V1), .layer
                continue
            layers += 1
            v1 = number == 2
            blob_field, rest, blobs = 6 if v1 else 7, bytearray(), []
            for field, kind, key_at, start, end in _fields(raw, at, after):
                if field == blob_field and kind == 2:
                    blobs.append((start, end))
                else:
                    rest += raw[key_at:end]
            layer = caffe_pb2.V1LayerParameter() if v1 else caffe_pb2.LayerParameter()
            _parse(layer, bytes(rest))
            name = layer.name
            arrays = [_blob(raw, s, e, f"{path}: layer {name!r}: blob {i}") for i, (s, e) in enumerate(blobs)]
            if arrays or name not in found:
                found[name] = arrays
    except _Corrupt as exc:
        raise _unreadable(path, "caffemodel", exc) from None
    if not layers:
        raise load_error(path, "holds no layers (an empty, truncated or non-Caffe file?)")
    return found


def fit_blob(array: np.ndarray, expected: Partial | None) -> np.ndarray | None:
    """``array`` in the ``expected`` shape, or None if it does not fit. A 4-D blob also fits a
    shape of fewer dims padded with leading 1s (Caffe's rule for legacy 4-D blobs: a bias is
    1x1x1xN, an InnerProduct weight 1x1xOUTxIN)."""
    if expected is None:
        return array

    def same(shape: Shape, want: Partial) -> bool:
        return len(shape) == len(want) and all(w is None or w == d for d, w in zip(shape, want, strict=True))

    if same(array.shape, expected):
        return array
    lead = 4 - len(expected)
    if array.ndim == 4 and lead > 0 and all(d == 1 for d in array.shape[:lead]) and same(array.shape[lead:], expected):
        return array.reshape(array.shape[lead:])
    return None


def _blobs(count: int) -> str:
    return f"{count} blob{'' if count == 1 else 's'}"


def check_blobs(
    origin: str | Path, layer: str, found: Sequence[np.ndarray] | None, specs: Sequence[BlobSpec]
) -> list[np.ndarray]:
    """``layer``'s blobs from a caffemodel, checked against ``specs``; an error names the layer,
    the blob (index and role) and both shapes."""
    if found is None:
        wanted = ", ".join(f"blob {i} ({s.role}) {show(s.shape)}" for i, s in enumerate(specs))
        raise load_error(origin, f"{layer}: not in the caffemodel (no layer of that name); it needs {wanted}")
    if len(found) < len(specs):
        i, spec = len(found), specs[len(found)]
        raise load_error(
            origin,
            f"{layer}: blob {i} ({spec.role}, shape {show(spec.shape)}) is missing: "
            f"the caffemodel has {_blobs(len(found))} for this layer, it needs {len(specs)}",
        )
    if len(found) > len(specs):
        roles = ", ".join(s.role for s in specs) or "none"
        raise load_error(origin, f"{layer}: the caffemodel has {_blobs(len(found))} for this layer; it takes {roles}")
    arrays = []
    for i, (spec, array) in enumerate(zip(specs, found, strict=True)):
        fitted = fit_blob(array, spec.shape)
        if fitted is None:
            raise load_error(
                origin,
                f"{layer}: blob {i} ({spec.role}) has shape {show(array.shape)} in the caffemodel, "
                f"the layer expects {show(spec.shape)}",
            )
        arrays.append(np.ascontiguousarray(fitted, dtype=np.float32))
    return arrays
