"""LRN operators: the fused op (registered as ``torch.ops.lrnserve.local_response_norm``), its
module, its ONNX export, and parameter conventions."""

from .lrn import (
    LocalResponseNorm,
    PerSample,
    local_response_norm,
    local_response_norm_checked,
    prepare,
)
from .onnx_translation import export as onnx_export
from .params import MODES, LRNParams, Mode
from .torch_op import OP_NAME, SUPPORTED_DTYPES, channels_last

__all__ = [
    "MODES",
    "OP_NAME",
    "SUPPORTED_DTYPES",
    "LRNParams",
    "LocalResponseNorm",
    "Mode",
    "PerSample",
    "channels_last",
    "local_response_norm",
    "local_response_norm_checked",
    "onnx_export",
    "prepare",
]
