"""Read image files (PNG, JPEG, BMP, TIFF, DICOM) into 8-bit grayscale frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from retrieval.errors import UnreadableImageError

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' magic at byte 128 for files without one."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix == "":
        try:
            with open(path, "rb") as fh:
                fh.seek(128)
                return fh.read(4) == b"DICM"
        except OSError:
            return False
    return False


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or (path.suffix == "" and is_dicom(path))


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


def read_raster(path: Path) -> np.ndarray:
    """One grayscale uint8 frame from a PNG/JPEG/BMP/TIFF file (fully decoded, so truncation is caught)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return to_gray_uint8(np.array(im))
            return np.array(im.convert("L"))
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"{path}: corrupt or truncated image ({exc})") from None


def read_frames(path: str | Path, ct_window: tuple[float, float] = (-100.0, 400.0)) -> list[np.ndarray]:
    """All frames of an image file as uint8 grayscale arrays (one for a still image)."""
    p = Path(path)
    if not p.exists():
        raise UnreadableImageError(f"{p}: file not found")
    if p.is_dir():
        raise UnreadableImageError(f"{p}: is a folder, not an image")
    if is_dicom(p):
        from retrieval.data.dicom import read_dicom_frames

        return read_dicom_frames(p, ct_window)
    if p.suffix.lower() not in RASTER_SUFFIXES:
        raise UnreadableImageError(f"{p}: unsupported file type '{p.suffix}' (use PNG, JPEG, BMP, TIFF or DICOM)")
    return [read_raster(p)]


def read_frame(path: str | Path, frame_index: int = -1, ct_window: tuple[float, float] = (-100.0, 400.0)) -> np.ndarray:
    """One frame: the still image, or frame `frame_index` of a multi-frame DICOM."""
    p = Path(path)
    if frame_index is not None and frame_index >= 0 and is_dicom(p):
        from retrieval.data.dicom import read_dicom_frames

        frames = read_dicom_frames(p, ct_window, only=frame_index)
        return frames[0]
    frames = read_frames(p, ct_window)
    return frames[0]
