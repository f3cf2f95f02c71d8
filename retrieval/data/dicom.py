"""DICOM via pydicom: rescale slope/intercept, CT windowing, MONOCHROME1, multi-frame clips."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.limits import MAX_FRAMES_ENV, MAX_PIXELS_ENV, limits
from retrieval.data.pixels import to_gray_uint8
from retrieval.errors import UnreadableImageError

log = logging.getLogger(__name__)

NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


@dataclass(frozen=True)
class DicomHeader:
    n_frames: int
    patient_id: str | None


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _int_tag(ds: Any, name: str, default: int, path: Path) -> int:
    """An integer attribute (IS/US) read defensively: a malformed value is the file's error, not ours."""
    if name not in ds:
        return default
    raw = ds[name].value
    if raw is None or raw == "":
        return default
    try:
        value = int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
    except (TypeError, ValueError, OverflowError):
        raise UnreadableImageError(path, f"invalid DICOM {name} {str(raw)[:20]!r}") from None
    return value


@contextmanager
def _quiet_pydicom(path: Path) -> Iterator[None]:
    """pydicom's warnings about one file become one log line, not one line per element or frame."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if caught:
        first = " ".join(str(caught[0].message).split())[:160]
        more = f" (and {len(caught) - 1} more)" if len(caught) > 1 else ""
        log.warning("%s: %s%s", path, first, more)


def _check_geometry(ds: Any, path: Path) -> int:
    """Frame count, after checking the header's claims against the limits; returns the number of frames."""
    lim = limits()
    n = _int_tag(ds, "NumberOfFrames", 1, path) or 1
    rows, cols = _int_tag(ds, "Rows", 0, path), _int_tag(ds, "Columns", 0, path)
    if n < 1:
        raise UnreadableImageError(path, f"invalid DICOM NumberOfFrames {n}")
    if n > lim.max_frames:
        raise UnreadableImageError(
            path, f"claims {n} frames, over the limit of {lim.max_frames} per file ({MAX_FRAMES_ENV})"
        )
    if rows < 0 or cols < 0 or rows * cols > lim.max_pixels:
        raise UnreadableImageError(
            path, f"{cols} x {rows} pixels per frame, over the limit of {lim.max_pixels} ({MAX_PIXELS_ENV})"
        )
    return n


def _check_pixel_data_length(ds: Any, n: int, path: Path) -> None:
    """The frames a header claims must fit in the pixel data it holds, before anything is decoded."""
    if "PixelData" not in ds:
        raise UnreadableImageError(path, "DICOM file without pixel data")
    held = len(ds.PixelData)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2.1"))
    if syntax in NATIVE_SYNTAXES:
        rows, cols = _int_tag(ds, "Rows", 0, path), _int_tag(ds, "Columns", 0, path)
        samples = _int_tag(ds, "SamplesPerPixel", 1, path)
        bits = _int_tag(ds, "BitsAllocated", 8, path)
        need = (n * rows * cols * samples * bits + 7) // 8
        if held < need:
            raise UnreadableImageError(
                path,
                f"header claims {n} frame(s) of {cols} x {rows} ({need} bytes) but the file holds "
                f"{held} bytes of pixel data",
            )
    elif held < 8 * n:  # an encapsulated frame needs at least one 8-byte item header
        raise UnreadableImageError(path, f"header claims {n} frames but the pixel data holds {held} bytes")


def read_dicom_header(path: Path) -> DicomHeader:
    """Frame count and PatientID without decoding pixels; the header's claims are checked against limits."""
    import pydicom

    try:
        with _quiet_pydicom(path):
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            n = _check_geometry(ds, path)
            pid_raw = ds.get("PatientID", None)
    except UnreadableImageError:
        raise
    except Exception as exc:  # pydicom parses untrusted bytes: any failure is this file's, reported in one line
        raise UnreadableImageError(path, f"not a readable DICOM file ({_brief(exc)})") from None
    pid = str(pid_raw).strip() if pid_raw is not None and str(pid_raw).strip() else None
    return DicomHeader(n_frames=n, patient_id=pid)


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_dicom_frames(path: Path, ct_window: tuple[float, float], only: int | None = None) -> list[np.ndarray]:
    """Decode pixels to uint8 grayscale frames.

    CT (Modality CT, or RescaleType HU) is windowed to `ct_window` after RescaleSlope/Intercept.
    Other modalities use the file's own WindowCenter/Width, else 8-bit values as they are, else the
    min/max of the whole clip (not per frame, so the frames of a clip stay comparable).
    """
    import pydicom

    try:
        with _quiet_pydicom(path):
            ds = pydicom.dcmread(str(path))
            n = _check_geometry(ds, path)
            _check_pixel_data_length(ds, n, path)
            pixels = ds.pixel_array
    except UnreadableImageError:
        raise
    except Exception as exc:  # pydicom and its decoders parse untrusted bytes: any failure is this file's
        raise UnreadableImageError(path, f"DICOM pixel data cannot be decoded ({_brief(exc)})") from None
    try:
        return _frames_from(ds, pixels, n, ct_window, only, path)
    except UnreadableImageError:
        raise
    except Exception as exc:  # header values of any shape drive the windowing: a bad one is the file's fault
        raise UnreadableImageError(path, f"DICOM pixel values cannot be interpreted ({_brief(exc)})") from None


def _frames_from(
    ds: Any, pixels: np.ndarray, n: int, ct_window: tuple[float, float], only: int | None, path: Path
) -> list[np.ndarray]:
    """Decoded pixels -> uint8 frames: rescale, window (CT window, the file's, or the clip's range), invert."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    is_colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or (
        pixels.ndim >= 3 and pixels.shape[-1] == 3 and getattr(ds, "SamplesPerPixel", 1) == 3
    )
    if pixels.ndim < 2 or pixels.size == 0:
        raise UnreadableImageError(path, f"decoded pixel data of shape {pixels.shape} is not an image")
    if is_colour and (pixels.ndim < 3 or pixels.shape[-1] != 3):
        raise UnreadableImageError(path, f"{photometric} pixels of shape {pixels.shape} are not colour images")
    # one stack of frames, whatever the header claimed: (n, rows, cols) or (n, rows, cols, 3)
    pixels = pixels.reshape(-1, *pixels.shape[-3:]) if is_colour else pixels.reshape(-1, *pixels.shape[-2:])
    if pixels.shape[0] != n:
        log.warning("%s: header says %d frame(s), the pixel data holds %d; using %d", path, n, len(pixels), len(pixels))
        n = len(pixels)
    if only is not None and not 0 <= only < n:
        raise UnreadableImageError(path, f"frame {only} requested but the file has {n} frame(s)")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    modality = str(getattr(ds, "Modality", ""))
    rescale_type = str(getattr(ds, "RescaleType", ""))
    is_ct = modality == "CT" or rescale_type.upper() == "HU"
    values = pixels.astype(np.float32) * slope + intercept if not is_colour else pixels
    if is_colour:
        lo = hi = None
    elif is_ct:
        lo, hi = ct_window
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        lo, hi = centre - width / 2, centre + max(width, 1.0) / 2
    elif pixels.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    else:  # one range for the whole clip, so its frames stay comparable
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
    if only is not None:
        values = values[only : only + 1]
    frames = []
    for frame in values:
        if is_colour:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space

                frame = convert_color_space(frame, photometric, "RGB")
            frames.append(to_gray_uint8(frame))
            continue
        assert lo is not None and hi is not None  # set for every grey-level branch above
        out = _window(frame, lo, hi)
        if photometric == "MONOCHROME1":
            out = 255 - out
        frames.append(out)
    return frames


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)
