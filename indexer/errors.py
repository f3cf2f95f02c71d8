"""Errors the user can fix. They live in the bottom layer so every layer above raises the same classes."""

from __future__ import annotations


class RetrieveError(Exception):
    """An error caused by input the user can fix; the CLI prints it as one line and exits 2."""

    exit_code = 2


class EncoderMismatchError(RetrieveError):
    """Vectors or an index built with a different encoder than the one asked for."""


class IndexBusyError(RetrieveError):
    """Another process holds the index's write lock for longer than we may wait."""
