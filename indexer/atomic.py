"""Atomic, durable writes that respect the user's umask.

A file is written beside its target under a temporary name, flushed to disk, given the mode a plain
`open()` would have given it (0666 less the umask; `mkstemp` alone would leave 0600) and renamed
over the target, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    make_dirs(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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
    finally:
        tmp_path.unlink(missing_ok=True)
