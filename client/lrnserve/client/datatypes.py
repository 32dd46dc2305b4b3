"""The one table of tensor datatypes: wire name, item size, numpy and torch names.

Shared by the client (numpy) and the server (torch); torch is named, never imported.
numpy has no bfloat16, so BF16 travels through numpy as its raw 16-bit pattern.
Which typed contents field carries a datatype follows from protocol.CONTENTS_FIELDS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import CONTENTS_FIELDS

_FIELD_OF: dict[type[np.generic], str] = {kind: name for name, kind in CONTENTS_FIELDS.items()}


@dataclass(frozen=True)
class DataType:
    wire: str
    itemsize: int
    numpy: np.dtype | None  # None: no numpy equivalent (BF16)
    torch: str  # attribute name in the torch module

    @property
    def contents_field(self) -> str | None:
        """The typed InferTensorContents field for this type, if the protocol has one (FP16 and BF16 have none).

        Derived from the protocol's table rather than listed here, so the two cannot disagree."""
        return _FIELD_OF.get(self.numpy.type) if self.numpy is not None else None

    @property
    def numpy_storage(self) -> np.dtype:
        """The numpy dtype that holds this type's bytes (uint16 for BF16)."""
        return self.numpy if self.numpy is not None else np.dtype(np.uint16)


DATATYPES: dict[str, DataType] = {
    d.wire: d
    for d in (
        DataType("FP32", 4, np.dtype("<f4"), "float32"),
        DataType("FP64", 8, np.dtype("<f8"), "float64"),
        DataType("FP16", 2, np.dtype("<f2"), "float16"),
        DataType("BF16", 2, None, "bfloat16"),
        DataType("UINT8", 1, np.dtype("u1"), "uint8"),  # images, for models that preprocess them
    )
}

_BY_TORCH = {d.torch: d for d in DATATYPES.values()}


def from_wire(name: str) -> DataType | None:
    return DATATYPES.get(name)


def from_numpy(dtype: np.dtype) -> DataType | None:
    for d in DATATYPES.values():
        if d.numpy is not None and d.numpy == np.dtype(dtype).newbyteorder("<"):
            return d
    return None


def from_torch_name(name: str) -> DataType | None:
    """``name`` as in ``str(tensor.dtype)`` with or without the ``torch.`` prefix."""
    return _BY_TORCH.get(name.removeprefix("torch."))


def wire_names() -> str:
    return ", ".join(DATATYPES)
