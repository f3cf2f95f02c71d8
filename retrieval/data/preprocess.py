"""Grayscale frame -> model-ready tensor: optional ultrasound sector crop, then resize to a square."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from retrieval.config import PreprocessConfig

SECTOR_THRESHOLD = 12  # grey level above which a pixel counts as image content rather than margin
MIN_SECTOR_FRACTION = 0.05  # below this share of the frame, the crop is not trusted and skipped


def sector_bbox(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right) of the largest bright connected region.

    The ultrasound sector is the largest connected non-black region; burned-in text, calibration
    marks and annotation bands are separate small regions, and a morphological opening cuts
    the thin links between them and the sector. Returns None when no region is large enough.
    """
    mask = img > SECTOR_THRESHOLD
    mask = ndimage.binary_opening(mask, structure=np.ones((5, 5), bool))
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < MIN_SECTOR_FRACTION * img.size:
        return None
    rows = np.flatnonzero(np.any(labels == biggest, axis=1))
    cols = np.flatnonzero(np.any(labels == biggest, axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_sector(img: np.ndarray) -> np.ndarray:
    """Drop black margins and annotation bands around the ultrasound sector (no-op if none found)."""
    box = sector_bbox(img)
    if box is None:
        return img
    top, bottom, left, right = box
    return img[top:bottom, left:right]


def resize_square(img: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Resize to size x size: 'pad' keeps the aspect ratio on a black canvas, 'squash' stretches."""
    pil = Image.fromarray(img)
    if mode == "squash":
        return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(pil.resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas


def preprocess_frame(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 grayscale frame -> uint8 square frame of cfg.image_size."""
    if cfg.crop_sector:
        img = crop_sector(img)
    return resize_square(img, cfg.image_size, cfg.resize)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> float32 (1, H, W) in [0, 1]; encoders do their own normalisation."""
    return torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0).unsqueeze(0)
