"""DICOM via pydicom: identity columns from the header, pixels through the Modality and VOI LUTs.

Pixel values go through pydicom's `apply_modality_lut` (rescale slope/intercept or a Modality LUT
Sequence) and `apply_voi_lut` (a VOI LUT Sequence, else WindowCenter/Width), then MONOCHROME1 is
inverted. A file without a VOI falls back to the configured CT window (CT) or its own range.
Compressed transfer syntaxes are decoded where a pydicom plug-in is installed; where none is, the
error names the package to install.
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from retrieval.data.limits import MAX_FRAMES_ENV, MAX_PIXELS_ENV, limits
from retrieval.data.pixels import to_gray_uint8
from retrieval.errors import UnreadableImageError

log = logging.getLogger(__name__)

DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is deflated
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED_SYNTAX}
# a deflated data set may inflate to at most this many bytes per pixel of the per-frame pixel limit: 512 MB by
# default, one frame at the limit as float64 (what decoding makes of it), so a 1 MB file cannot become 1 GB
INFLATED_BYTES_PER_PIXEL = 8
_INFLATE_CHUNK = 1 << 20
# the columns a DICOM file fills, under the names agreed for every index (keyword in the header -> column)
IDENTITY_TAGS = {
    "PatientID": "patient_id",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_uid",
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "StudyDate": "study_date",
    "AccessionNumber": "accession",
}
IDENTITY_COLUMNS = tuple(IDENTITY_TAGS.values())
# what to install for a compressed transfer syntax pydicom cannot decode here (by UID prefix)
PLUGINS = (
    ("1.2.840.10008.1.2.4.8", "pylibjpeg pylibjpeg-libjpeg"),  # JPEG-LS
    ("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg"),  # JPEG 2000
    ("1.2.840.10008.1.2.4.20", "pylibjpeg pylibjpeg-openjpeg"),  # HTJ2K
    ("1.2.840.10008.1.2.4.", "pylibjpeg pylibjpeg-libjpeg"),  # the JPEG processes
    ("1.2.840.10008.1.2.5", "pylibjpeg pylibjpeg-rle"),  # RLE
)


@dataclass(frozen=True)
class DicomHeader:
    n_frames: int
    patient_id: str | None
    identity: dict[str, str | None]  # IDENTITY_COLUMNS -> value (never the patient's name)


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


def max_inflated_bytes() -> int:
    """The most bytes a deflated data set may inflate to (INFLATED_BYTES_PER_PIXEL x the pixel limit)."""
    return INFLATED_BYTES_PER_PIXEL * limits().max_pixels


def check_inflated_size(path: Path) -> None:
    """Refuse a deflated file whose data set inflates past `max_inflated_bytes`, before pydicom inflates it.

    pydicom inflates a Deflated Explicit VR Little Endian data set whole, in one call, before it reads a
    single element (even for a header-only read), so a 1 MB file can take 1 GB and more. The file meta group
    is not deflated: it is read here (`_meta_transfer_syntax`, explicit or implicit VR as pydicom accepts
    it), then the rest is inflated in pieces that are counted and dropped (memory stays at a few MB), and
    pydicom reads the file only once it is known to fit. It fails closed: a meta group this reader cannot
    follow to its end, or one pydicom's own meta reader calls deflated where this one does not, is refused.
    Any other transfer syntax returns at once.
    """
    with open(path, "rb") as fh:
        try:
            syntax, plain = _walk_meta(fh)
        except _UnfollowableMeta as exc:
            raise UnreadableImageError(path, f"DICOM file meta group {exc}: refused") from None
        if syntax != DEFLATED_SYNTAX:
            # a meta group of explicit-VR elements only is read by pydicom as here; any other layout is checked
            # against pydicom's own reader too (92 us a file, a quarter of a header read: not for every file)
            if not plain and _pydicom_meta_syntax(path) == DEFLATED_SYNTAX:
                raise UnreadableImageError(path, "deflated data set behind a file meta group of an odd layout: refused")
            return
        cap = max_inflated_bytes()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while not inflater.eof:
            data = inflater.unconsumed_tail or fh.read(_INFLATE_CHUNK)
            if not data:
                break  # a truncated stream: pydicom's own read reports it
            total += len(inflater.decompress(data, min(_INFLATE_CHUNK, cap + 1 - total)))
            if total > cap:
                raise UnreadableImageError(
                    path,
                    f"deflated data set larger than {cap} bytes once inflated, over the limit of {cap} "
                    f"({INFLATED_BYTES_PER_PIXEL} x {MAX_PIXELS_ENV})",
                )


def _pydicom_meta_syntax(path: Path) -> str | None:
    """The transfer syntax pydicom's public meta reader finds (it never inflates; it needs the preamble)."""
    import pydicom

    try:
        found = pydicom.filereader.read_file_meta_info(str(path)).get("TransferSyntaxUID")
    except Exception:  # no preamble, or a meta group pydicom cannot read either
        return None
    return None if found is None else str(found).strip("\0 ")


class _UnfollowableMeta(Exception):
    """A file meta group whose elements cannot be walked to its end (the reason is the message)."""


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS",
    b"ST", b"TM", b"UI", b"UL", b"US",
}  # fmt: skip
_UNDEFINED = 0xFFFFFFFF


def _meta_transfer_syntax(fh: BinaryIO) -> str | None:
    """The transfer syntax a file's meta group (0002, never deflated) names (`_walk_meta`)."""
    return _walk_meta(fh)[0]


def _walk_meta(fh: BinaryIO) -> tuple[str | None, bool]:
    """(the transfer syntax a file's meta group names, whether every element was explicit VR), read with
    `struct` (pydicom's own reader that leaves the file at the data set is private API). Each element is read
    as explicit VR when it carries a VR, else as implicit VR (pydicom accepts both); the file is left at the
    first byte after the meta group and any command group (0000), where a deflated data set starts. The syntax
    is None when the file has no meta group; _UnfollowableMeta for an element of undefined length or one cut
    short."""
    head = fh.read(132)
    fh.seek(132 if head[128:132] == b"DICM" else 0)  # without the preamble: from the start, as force=True
    syntax, plain = None, True
    while True:
        at = fh.tell()
        tag = fh.read(8)
        if len(tag) < 8:
            if tag and syntax is not None:
                raise _UnfollowableMeta("cut short")
            return syntax, plain
        group, element = struct.unpack("<HH", tag[:4])
        if group == 0x0002 and tag[4:6] in _LONG_VRS:  # explicit VR, 2 reserved bytes and a 4-byte length
            extra = fh.read(4)
            if len(extra) < 4:
                raise _UnfollowableMeta("cut short")
            length = struct.unpack("<I", extra)[0]
        elif group == 0x0002 and tag[4:6] in _SHORT_VRS:  # explicit VR, a 2-byte length
            length = struct.unpack("<H", tag[6:8])[0]
        elif group in (0x0000, 0x0002):  # implicit VR (a command group always is): a 4-byte length
            length = struct.unpack("<I", tag[4:8])[0]
            plain = False
        else:
            fh.seek(at)
            return syntax, plain
        if length == _UNDEFINED:
            raise _UnfollowableMeta(f"element ({group:04X},{element:04X}) of undefined length")
        value = fh.read(length)
        if len(value) < length:
            raise _UnfollowableMeta("cut short")
        if (group, element) == (0x0002, 0x0010):
            syntax = value.decode("ascii", "replace").strip("\0 ")


def _dcmread(path: Path, **kwargs: Any) -> Any:
    """pydicom's read; a file without the 128-byte preamble and 'DICM' is read again with force=True.

    A deflated data set is checked first (`check_inflated_size`): pydicom would inflate all of it.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    check_inflated_size(path)
    try:
        return pydicom.dcmread(str(path), **kwargs)
    except InvalidDicomError:
        ds = pydicom.dcmread(str(path), force=True, **kwargs)
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta: name the encoding the bytes were read in
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


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


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID", None) or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if uid is None:
        return "no SOP class"
    return str(getattr(uid, "name", uid))


def _check_pixel_data_length(ds: Any, n: int, path: Path) -> None:
    """The frames a header claims must fit in the pixel data it holds, before anything is decoded."""
    if "PixelData" not in ds:
        raise UnreadableImageError(path, f"DICOM file without pixel data ({_sop_class(ds)})")
    held = len(ds.PixelData)
    syntax = _syntax(ds)
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


def _syntax(ds: Any) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or "1.2.840.10008.1.2.1")


def check_decoder(ds: Any, path: Path) -> None:
    """A compressed file whose transfer syntax no installed pydicom plug-in decodes: one line naming the plug-in."""
    syntax = _syntax(ds)
    if syntax in NATIVE_SYNTAXES:
        return
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    name = UID(syntax).name or syntax
    try:
        decoder = get_decoder(UID(syntax))
    except NotImplementedError:
        raise UnreadableImageError(path, f"transfer syntax {name} ({syntax}) is not supported by pydicom") from None
    if decoder.is_available:
        return
    install = next((pkg for prefix, pkg in PLUGINS if syntax.startswith(prefix)), "pylibjpeg python-gdcm")
    raise UnreadableImageError(
        path, f"pixel data compressed as {name}: no decoder installed here; install one: pip install {install}"
    )


def _text(value: object) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def read_dicom_header(path: Path) -> DicomHeader:
    """Frame count and the identity columns without decoding pixels; the geometry is checked against limits."""
    try:
        with _quiet_pydicom(path):
            ds = _dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise UnreadableImageError(path, f"DICOM file without pixel data ({_sop_class(ds)})")
            n = _check_geometry(ds, path)
            identity = {col: _text(ds.get(tag, None)) for tag, col in IDENTITY_TAGS.items()}
    except UnreadableImageError:
        raise
    except Exception as exc:  # pydicom parses untrusted bytes: any failure is this file's, reported in one line
        raise UnreadableImageError(path, f"not a readable DICOM file ({_brief(exc)})") from None
    return DicomHeader(n_frames=n, patient_id=identity["patient_id"], identity=identity)


def read_dicom_frames(path: Path, ct_window: tuple[float, float], only: int | None = None) -> list[np.ndarray]:
    """Decode pixels to uint8 grayscale frames (Modality LUT, VOI LUT or the fallback window, MONOCHROME1)."""
    try:
        with _quiet_pydicom(path):
            ds = _dcmread(path)
            n = _check_geometry(ds, path)
            _check_pixel_data_length(ds, n, path)
            check_decoder(ds, path)
            if hasattr(ds, "pixel_array_options"):  # pydicom 3: frames past NumberOfFrames are not decoded
                ds.pixel_array_options(allow_excess_frames=False)
            pixels = ds.pixel_array
    except UnreadableImageError:
        raise
    except Exception as exc:  # pydicom and its decoders parse untrusted bytes: any failure is this file's
        raise UnreadableImageError(path, f"DICOM pixel data cannot be decoded ({_brief(exc)})") from None
    try:
        with _quiet_pydicom(path):
            return _frames_from(ds, pixels, n, ct_window, only, path)
    except UnreadableImageError:
        raise
    except Exception as exc:  # header values of any shape drive the LUTs: a bad one is the file's fault
        raise UnreadableImageError(path, f"DICOM pixel values cannot be interpreted ({_brief(exc)})") from None


def _has_voi(ds: Any) -> bool:
    seq = ds.get("VOILUTSequence", None)
    if seq and seq[0].get("LUTDescriptor", None) is not None and seq[0].get("LUTData", None) is not None:
        return True
    return ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None


def _voi_to_uint8(values: np.ndarray, ds: Any) -> np.ndarray:
    """pydicom's apply_voi_lut, then its output range to 0..255.

    The output range of a VOI LUT Sequence is taken as its data's min..max; that of a window (LINEAR,
    LINEAR_EXACT, SIGMOID) as the values pydicom gives far below and far above the window.
    """
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence", None)
    uses_lut = bool(seq) and seq[0].get("LUTData", None) is not None and seq[0].get("LUTDescriptor", None) is not None
    if uses_lut and np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # a LUT looks up whole stored values
    out = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if uses_lut:
        lut = np.asarray(apply_voi_lut(np.arange(-(2**16), 2**16, dtype=np.int64), ds), dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())
    else:
        with np.errstate(over="ignore"):  # SIGMOID at the far ends
            ends = np.asarray(apply_voi_lut(np.array([-1e30, 1e30]), ds), dtype=np.float64)
        lo, hi = float(ends.min()), float(ends.max())
    if hi <= lo:
        hi = lo + 1.0
    return _window(out, lo, hi)


def _frames_from(
    ds: Any, pixels: np.ndarray, n: int, ct_window: tuple[float, float], only: int | None, path: Path
) -> list[np.ndarray]:
    """Decoded pixels -> uint8 frames: Modality LUT, then VOI (the file's, the CT window, or the clip's range)."""
    from pydicom.pixels import apply_modality_lut

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
    # NumberOfFrames says how many frames there are (PS3.5 8.1.1: the pixel data holds exactly those, plus
    # padding); data past them is not frames, and decoding it would escape the frame limit the header was
    # checked against. So more frames than the header says are dropped; fewer (a short encapsulated file)
    # are used as they are.
    if pixels.shape[0] > n:
        log.warning("%s: header says %d frame(s), the pixel data holds %d; using %d", path, n, len(pixels), n)
        pixels = pixels[:n]
    elif pixels.shape[0] < n:
        log.warning("%s: header says %d frame(s), the pixel data holds %d; using %d", path, n, len(pixels), len(pixels))
        n = len(pixels)
    max_frames = limits().max_frames
    if n > max_frames:  # what is decoded, checked again: the header's claim was checked before decoding
        raise UnreadableImageError(
            path, f"holds {n} frames, over the limit of {max_frames} per file ({MAX_FRAMES_ENV})"
        )
    if only is not None and not 0 <= only < n:
        raise UnreadableImageError(path, f"frame {only} requested but the file has {n} frame(s)")
    if is_colour:
        frames = []
        for frame in pixels if only is None else pixels[only : only + 1]:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space

                frame = convert_color_space(frame, photometric, "RGB")
            frames.append(to_gray_uint8(frame))
        return frames
    values = apply_modality_lut(pixels, ds)
    picked = values if only is None else values[only : only + 1]
    if _has_voi(ds):
        out = _voi_to_uint8(picked, ds)
    else:
        is_ct = str(getattr(ds, "Modality", "")) == "CT" or str(getattr(ds, "RescaleType", "")).upper() == "HU"
        if is_ct:
            lo, hi = ct_window
        elif values.dtype == np.uint8:
            lo, hi = 0.0, 255.0
        else:  # one range for the whole clip, so its frames stay comparable
            lo, hi = float(np.min(values)), float(np.max(values))
            if hi <= lo:
                hi = lo + 1.0
        out = _window(np.asarray(picked, dtype=np.float64), lo, hi)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return list(out)


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
