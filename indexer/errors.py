"""Errors the user can fix. They live in the bottom layer so every layer above raises the same classes."""

from __future__ import annotations

import errno
import os


class RetrieveError(Exception):
    """An error caused by input the user can fix; the CLI prints it as one line and exits 2."""

    exit_code = 2


class EncoderMismatchError(RetrieveError):
    """Vectors or an index built with a different encoder than the one asked for."""


class IndexBusyError(RetrieveError):
    """Another process holds the index's write lock for longer than we may wait."""


class StorageError(RetrieveError):
    """A file or folder the environment will not let us write (or read): a read-only or full disk, no
    permission, a folder where a file should be. The message names the path and the system's reason."""


# errno values that describe the machine, not a bug in the tool: reported as one line, exit 2.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.EFBIG,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.ELOOP,
        errno.EBUSY,
        errno.ETXTBSY,
        errno.ENOMEM,
    }
)


def errno_reason(code: int) -> str:
    """'read-only file system', 'no space left on device', 'permission denied' (the system's words)."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def environment_error(exc: OSError, path: object = None) -> StorageError | None:
    """A one-line StorageError naming `path` (else the exception's own file) for an OSError the environment
    caused (see ENVIRONMENT_ERRNOS); None for any other OSError, which stays a bug to report."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = path if path is not None else exc.filename
    reason = errno_reason(exc.errno)
    return StorageError(f"{where}: {reason}" if where is not None else reason)


_FAISS_REASONS = {errno_reason(code).lower(): code for code in ENVIRONMENT_ERRNOS}


def faiss_write_error(exc: RuntimeError, path: object) -> StorageError:
    """FAISS reports a failed write as a RuntimeError whose text ends with the system's reason; name the
    target file and that reason in one line."""
    text = str(exc).lower()
    for reason in _FAISS_REASONS:
        if reason in text:
            return StorageError(f"{path}: {reason}")
    first = " ".join(str(exc).split())[:200]
    return StorageError(f"{path}: FAISS could not write the index ({first})")
