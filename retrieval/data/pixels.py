"""Pixel arrays of any type and range -> 8-bit grayscale."""

from __future__ import annotations

import numpy as np


def to_gray_uint8(arr: np.ndarray) -> np.ndarray:
    """Collapse colour channels (ITU-R 601 luma) and map any numeric range to uint8.

    8-bit input keeps its values; wider or float input is stretched from its own min/max.
    """
    a = np.asarray(arr)
    source_is_uint8 = a.dtype == np.uint8
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        if a.shape[-1] == 1:
            a = a[..., 0]
        else:
            a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {np.asarray(arr).shape}")
    if source_is_uint8:
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
