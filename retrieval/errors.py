"""User-facing errors: each carries a one-line message that names the file or option at fault."""

from __future__ import annotations

from indexer.errors import EncoderMismatchError, IndexBusyError, RetrieveError, StorageError, environment_error

__all__ = [
    "RetrieveError",
    "UnreadableImageError",
    "EncoderMismatchError",
    "IndexBusyError",
    "StorageError",
    "environment_error",
]


class UnreadableImageError(RetrieveError):
    """An image file that cannot be decoded (corrupt, truncated, not an image, over a limit)."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = " ".join(reason.split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")
