"""The classification extension: a batch's [N, classes] output as each sample's top k classes.

Done per request after its batch ran (the batch computes the plain output for everyone);
answered as Triton does: a BYTES tensor [N, k] of ``"score:index"`` or ``"score:index:label"``,
best first, the score printed like C's ``%f`` (Triton's ``std::to_string``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lrnserve.client.datatypes import DataType

BYTES = "BYTES"


def scores(raw: bytes | memoryview, datatype: DataType, shape: tuple[int, ...]) -> np.ndarray:
    """The output's bytes as a float array of ``shape`` (BF16, which numpy lacks, widened)."""
    values = np.frombuffer(raw, dtype=datatype.numpy_storage).reshape(shape)
    if datatype.numpy is None:  # BF16: the upper half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def top_classes(values: np.ndarray, k: int, labels: Sequence[str] | None) -> list[list[str]]:
    """Each row's ``k`` best classes as Triton's strings; ties keep the lower index first."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]  # negation is exact in every float type
    picked = np.take_along_axis(values, order, axis=1).tolist()
    rows = []
    for row_scores, indices in zip(picked, order.tolist(), strict=True):
        texts = [f"{float(score):f}:{index}" for score, index in zip(row_scores, indices, strict=True)]
        if labels is not None:
            texts = [f"{text}:{labels[index]}" for text, index in zip(texts, indices, strict=True)]
        rows.append(texts)
    return rows


def encode_bytes(elements: Sequence[str]) -> bytes:
    """A BYTES tensor's wire form: each element a 4-byte little-endian length, then its bytes."""
    parts: list[bytes] = []
    for element in elements:
        data = element.encode("utf-8")
        parts += (len(data).to_bytes(4, "little"), data)
    return b"".join(parts)


def classify(
    raw: bytes | memoryview, datatype: DataType, shape: tuple[int, ...], k: int, labels: Sequence[str] | None
) -> tuple[tuple[int, int], bytes]:
    """The classification answer for one request's output: its shape [N, k] and BYTES contents."""
    rows = top_classes(scores(raw, datatype, shape), k, labels)
    return (shape[0], k), encode_bytes([text for row in rows for text in row])
