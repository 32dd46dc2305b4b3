"""Float64 loop references for LRN, written straight from docs/lrn.md.

Deliberately naive: explicit loops over window offsets with bounds checks, so
that they share no code (and no cleverness) with the implementations under test.
"""

from __future__ import annotations

import numpy as np


def lrn_reference(x: np.ndarray, size: int, alpha: float, beta: float, k: float, mode: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    _, c_, h_, w_ = x.shape
    before, after = size // 2, (size - 1) // 2
    square = x * x
    total = np.zeros_like(x)
    if mode == "across":
        for c in range(c_):
            for j in range(c - before, c + after + 1):
                if 0 <= j < c_:
                    total[:, c] += square[:, j]
        scale = alpha / size
    elif mode == "within":
        for dh in range(-before, after + 1):
            for dw in range(-before, after + 1):
                for h in range(h_):
                    if not 0 <= h + dh < h_:
                        continue
                    for w in range(w_):
                        if 0 <= w + dw < w_:
                            total[:, :, h, w] += square[:, :, h + dh, w + dw]
        scale = alpha / (size * size)
    else:
        raise ValueError(mode)
    return x / (k + scale * total) ** beta
