"""LRN operators: the fused op, its module, and parameter conventions."""

from .lrn import (
    SUPPORTED_DTYPES,
    LocalResponseNorm,
    PerSample,
    local_response_norm,
    local_response_norm_checked,
    prepare,
)
from .params import MODES, LRNParams, Mode

__all__ = [
    "MODES",
    "SUPPORTED_DTYPES",
    "LRNParams",
    "LocalResponseNorm",
    "Mode",
    "PerSample",
    "local_response_norm",
    "local_response_norm_checked",
    "prepare",
]
