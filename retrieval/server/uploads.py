"""Uploaded query images: type by content (magic bytes), pixel limits from the header before decoding."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image

from retrieval.data.dicom import read_dicom_header
from retrieval.data.imageio import pil_bomb_reason
from retrieval.data.limits import MAX_FRAMES_ENV, MAX_PIXELS_ENV, limits
from retrieval.errors import RetrieveError, UnreadableImageError

SUFFIX_BY_KIND = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


class UploadError(RetrieveError):
    """A bad upload, with the HTTP status that says why (413 too big, 415 wrong type, 422 unreadable)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def sniff_kind(head: bytes) -> str | None:
    """png, jpeg or dicom from the first 132 bytes; None for anything else, whatever its name says."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def clean_name(filename: str | None) -> str:
    """The client's file name as a label for the answer: its last part, printable, at most 200 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if c.isprintable())[:200].strip()
    return name or "upload"


def _over_limit(reason: str) -> bool:
    return MAX_PIXELS_ENV in reason or MAX_FRAMES_ENV in reason


def check_header(path: Path, kind: str, name: str, max_frames: int | None = None) -> None:
    """Refuse an image whose header claims more pixels or frames than the limits, before any decoding;
    `max_frames`: the most frames one upload may query with (`retrieve serve --max-query-frames`)."""
    if kind == "dicom":
        try:
            frames = read_dicom_header(path).n_frames
        except UnreadableImageError as exc:
            raise UploadError(413 if _over_limit(exc.reason) else 422, f"{name}: {exc.reason}") from None
        if max_frames is not None and frames > max_frames:
            raise UploadError(
                413,
                f"{name}: {frames} frames, over the limit of {max_frames} a query may use (--max-query-frames); "
                "query with a shorter clip or a few frames of it",
            )
        return
    max_pixels = limits().max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:  # PIL's own limit, past about 179 megapixels: ours is lower
        raise UploadError(413, f"{name}: {pil_bomb_reason(exc, max_pixels)}") from None
    except Exception as exc:  # PIL parses untrusted bytes: any failure is the upload's
        raise UploadError(422, f"{name}: not a readable {kind.upper()} image ({type(exc).__name__})") from None
    if width * height > max_pixels:
        raise UploadError(413, f"{name}: {width} x {height} pixels, over the limit of {max_pixels} ({MAX_PIXELS_ENV})")


def unreadable(error: str, tmp: Path, name: str) -> UploadError:
    """A decoding error from the library, about our temporary file, as the client's error about its upload."""
    reason = error[len(f"{tmp}: ") :] if error.startswith(f"{tmp}: ") else error.replace(str(tmp), name)
    return UploadError(413 if _over_limit(reason) else 422, f"{name}: {reason}")
