"""Facts of the Open Inference Protocol (KServe v2 gRPC) that the client and the server share.

Both sides import them from here, so a client and a server from the same release
cannot disagree on a method path, a message size limit or which typed contents
field carries which numpy dtype. numpy only: the server imports this without the
client's gRPC machinery, and the client without torch.
"""

from __future__ import annotations

import numpy as np

SERVICE = "inference.GRPCInferenceService"
"""The protocol's gRPC service, as named in grpc_predict_v2.proto."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message either side sends or accepts by default: gRPC's 4 MiB is too small for image batches."""


def method(name: str) -> str:
    """The full gRPC path of one of the service's RPCs: ``method("ModelInfer")`` is
    '/inference.GRPCInferenceService/ModelInfer'."""
    return f"/{SERVICE}/{name}"


CONTENTS_FIELDS: dict[str, type[np.generic]] = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
"""The numeric fields of InferTensorContents and the numpy type their values have
(``bytes_contents``, for BYTES tensors, is not numeric and not listed)."""
