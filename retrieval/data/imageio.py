"""Read image files (PNG, JPEG, BMP, TIFF, DICOM) into 8-bit grayscale frames."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from retrieval.data.dicom import check_inflated_size, read_dicom_frames
from retrieval.data.limits import MAX_PIXELS_ENV, limits
from retrieval.data.pixels import to_gray_uint8
from retrieval.errors import UnreadableImageError

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES


def is_dicom(path: Path) -> bool:
    """DICOM by content: '.dcm'/'.dicom', or any file without a raster suffix whose bytes are DICOM.

    The bytes are DICOM when 'DICM' stands at offset 128 (the Part 10 preamble) or, for files written
    without the preamble, when the file starts with a group 0x0002/0x0008 element and pydicom's forced
    read of the header finds an image's attributes in it. PACS exports name files IM0001, 1.2.840..., so
    the suffix says nothing.
    """
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    return head[:2] in (b"\x02\x00", b"\x08\x00") and _forced_read_is_dicom(path)


def _forced_read_is_dicom(path: Path) -> bool:
    """A preamble-less file: DICOM when pydicom's forced header read finds an image's attributes."""
    import pydicom

    try:
        check_inflated_size(path)  # pydicom would inflate a deflated data set whole, even for the header
    except UnreadableImageError:
        return True  # a file meta announcing a deflated data set too large: the reader refuses it in one line
    except Exception:  # any parse failure: not DICOM
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
            return "SOPClassUID" in ds and ("Rows" in ds or "Modality" in ds)
    except Exception:  # any parse failure: not DICOM
        return False


def pil_bomb_reason(exc: Exception, max_pixels: int) -> str:
    """PIL's DecompressionBombError (raised by Image.open past about 179 megapixels) as our pixel-limit message.

    PIL refuses before we see the size; its message holds the pixel count, which is named when it is there.
    """
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1))} pixels" if found else "more pixels than PIL allows"
    return f"{size}, over the limit of {max_pixels} ({MAX_PIXELS_ENV})"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES or is_dicom(path)


def read_raster(path: Path) -> np.ndarray:
    """One grayscale uint8 frame from a PNG/JPEG/BMP/TIFF file (fully decoded, so truncation is caught).

    The size in the header is checked against the pixel limit before anything is decoded, so a
    decompression bomb costs nothing.
    """
    max_pixels = limits().max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise UnreadableImageError(
                        path, f"{width} x {height} pixels, over the limit of {max_pixels} ({MAX_PIXELS_ENV})"
                    )
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    return to_gray_uint8(np.array(im))
                return np.array(im.convert("L"))
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not a readable image") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, pil_bomb_reason(exc, max_pixels)) from None
    except Exception as exc:  # PIL's decoders parse untrusted bytes: any failure is this file's, in one line
        msg = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UnreadableImageError(path, f"corrupt or truncated image ({msg})") from None


def read_frames(path: str | Path, ct_window: tuple[float, float] = (-100.0, 400.0)) -> list[np.ndarray]:
    """All frames of an image file as uint8 grayscale arrays (one for a still image)."""
    p = Path(path)
    if not p.exists():
        raise UnreadableImageError(p, "file not found")
    if p.is_dir():
        raise UnreadableImageError(p, "is a folder, not an image")
    if is_dicom(p):
        return read_dicom_frames(p, ct_window)
    if p.suffix.lower() not in RASTER_SUFFIXES:
        raise UnreadableImageError(p, f"unsupported file type '{p.suffix}' (use PNG, JPEG, BMP, TIFF or DICOM)")
    return [read_raster(p)]


def read_frame(path: str | Path, frame_index: int = -1, ct_window: tuple[float, float] = (-100.0, 400.0)) -> np.ndarray:
    """One frame: the still image, or frame `frame_index` of a multi-frame DICOM."""
    p = Path(path)
    if frame_index is not None and frame_index >= 0 and is_dicom(p):
        frames = read_dicom_frames(p, ct_window, only=frame_index)
        return frames[0]
    frames = read_frames(p, ct_window)
    return frames[0]
