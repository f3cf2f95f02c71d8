"""User-facing errors: each carries a one-line message that names the file or option at fault."""

from __future__ import annotations


class RetrieveError(Exception):
    """An error caused by input the user can fix; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class UnreadableImageError(RetrieveError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


class EncoderMismatchError(RetrieveError):
    """Vectors or an index built with a different encoder than the one asked for."""
