"""Limits on input, checked before any large allocation: pixels per frame, frames per file.

Defaults suit ultrasound and CT (frames of at most a few megapixels, cine clips of hundreds of
frames) with a wide margin; change them with the environment variables below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from retrieval.errors import RetrieveError

MAX_PIXELS_ENV = "RETRIEVE_MAX_PIXELS"
MAX_FRAMES_ENV = "RETRIEVE_MAX_FRAMES"
MAX_UPLOAD_MB = 50  # one uploaded file, in the browser (its web server is told the same) and `retrieve serve`


@dataclass(frozen=True)
class InputLimits:
    max_pixels: int = 64_000_000  # width x height of one frame (8000 x 8000)
    max_frames: int = 5_000  # frames in one file

    @classmethod
    def from_env(cls) -> InputLimits:
        return cls(
            max_pixels=_positive_int(MAX_PIXELS_ENV, cls.max_pixels),
            max_frames=_positive_int(MAX_FRAMES_ENV, cls.max_frames),
        )


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise RetrieveError(f"{name}={raw!r}: expected a positive whole number")
    return value


def limits() -> InputLimits:
    return InputLimits.from_env()
