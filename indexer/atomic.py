"""Atomic, durable writes that respect the user's umask.

A file is written beside its target under a temporary name, flushed to disk, given the mode a plain
`open()` would have given it (0666 less the umask; `mkstemp` alone would leave 0600) and renamed
over the target, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.errors import StorageError, environment_error


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(folder: str | Path) -> Path:
    """mkdir -p with the umask's mode (what `Path.mkdir` does too; here for symmetry and clarity)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename it onto the target."""
    target = Path(target)
    if target.is_dir():
        raise StorageError(f"{target}: is a folder; give the path of a file to write")
    try:
        make_dirs(target.parent)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a parent folder should be
            raise StorageError(f"{target}: {_nearest_existing(target.parent)} is a file, not a folder") from None
        raise environment_error(exc, target) or exc from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, file_mode())
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, target)
            fsync_dir(target.parent)
    except OSError as exc:
        # a failed write of the temporary file (a full disk; pyarrow names no file): name the target instead
        if exc.filename is None or str(exc.filename) == tmp:
            raise environment_error(exc, target) or exc from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(".")


def check_writable(target: str | Path, option: str, folder: bool = False) -> None:
    """Before long work: refuse an output path that cannot be written, in one line naming `option` and the
    path (a folder where a file goes or the reverse, a read-only file system, no permission). Creates
    nothing: missing parent folders are made when the output is written."""
    target = Path(target)
    if folder:
        if target.exists() and not target.is_dir():
            raise StorageError(f"{option} {target}: is a file; give a folder to write into")
    elif target.is_dir():
        raise StorageError(f"{option} {target}: is a folder; give the path of a file to write")
    elif target.exists() and not target.is_file():
        raise StorageError(f"{option} {target}: not a regular file")
    base = _nearest_existing(target if folder else target.parent)
    if not base.is_dir():
        raise StorageError(f"{option} {target}: {base} is a file, not a folder")
    try:  # the one sure test (root ignores permission bits; access() misses some mounts): make a file, drop it
        fd, probe = tempfile.mkstemp(dir=base, prefix=".retrieve-probe.", suffix=".tmp")
    except OSError as exc:
        err = environment_error(exc, base)
        if err is None:
            raise
        raise StorageError(f"{option} {target}: cannot write in {err}") from None
    os.close(fd)
    os.unlink(probe)
