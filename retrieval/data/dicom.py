"""DICOM via pydicom: rescale slope/intercept, CT windowing, MONOCHROME1, multi-frame clips."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import UnreadableImageError


@dataclass(frozen=True)
class DicomHeader:
    n_frames: int
    patient_id: str | None
    modality: str | None


def read_dicom_header(path: Path) -> DicomHeader:
    """Frame count, PatientID and Modality without decoding pixels."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UnreadableImageError(f"{path}: not a readable DICOM file ({exc})") from None
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    pid = str(ds.PatientID).strip() if "PatientID" in ds and str(ds.PatientID).strip() else None
    modality = str(ds.Modality) if "Modality" in ds else None
    return DicomHeader(n_frames=n, patient_id=pid, modality=modality)


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_dicom_frames(path: Path, ct_window: tuple[float, float], only: int | None = None) -> list[np.ndarray]:
    """Decode pixels to uint8 grayscale frames.

    CT (Modality CT, or RescaleType HU) is windowed to `ct_window` after RescaleSlope/Intercept.
    Other modalities use the file's own WindowCenter/Width, else 8-bit values as they are, else the
    min/max of the whole clip (not per frame, so the frames of a clip stay comparable).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from retrieval.data.imageio import to_gray_uint8

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, RuntimeError) as exc:
        raise UnreadableImageError(f"{path}: DICOM pixel data cannot be decoded ({exc})") from None
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    is_colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or (
        pixels.ndim >= 3 and pixels.shape[-1] == 3 and getattr(ds, "SamplesPerPixel", 1) == 3
    )
    if n == 1:
        pixels = pixels[None]
    if only is not None and not 0 <= only < n:
        raise UnreadableImageError(f"{path}: frame {only} requested but the file has {n} frame(s)")
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
        lo, hi = centre - width / 2, centre + width / 2
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
