"""Relocatable indexes: each row stores its file's path relative to the data root the manifest records.

The manifest records the data root twice: as an absolute path and as a path relative to the index
folder. Where the files are now is, in this order: the root the caller names (`--data-root`, which must
hold the files), the recorded root relative to the index (a folder holding data and index moved as
one), the recorded absolute root. Indexes built before this (absolute paths, no recorded root) are read
as they are. `relocate_index` records a new root under the index's write lock, atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from indexer.index_dir import IndexDir, open_index_dir, read_manifest, set_data_root
from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

REL_PATH = "rel_path"  # a row's file, relative to the index's data root (null for a file outside it)
SAMPLE = 8  # rows whose files prove that a folder is the data root


def with_rel_paths(rows: pd.DataFrame, root: Path | None) -> pd.DataFrame:
    """`rows` with rel_path: each absolute `path` relative to `root` (null for a file outside it)."""
    out = rows.copy()
    if root is None:
        return out
    base = Path(root).resolve()

    def rel(p: object) -> str | None:
        try:
            return Path(str(p)).relative_to(base).as_posix()
        except ValueError:
            return None

    out[REL_PATH] = pd.Series([rel(p) for p in out["path"]], index=out.index, dtype="string")
    return out


def resolve_paths(rows: pd.DataFrame, root: Path | None) -> pd.DataFrame:
    """`rows` whose `path` is where the file is now: root / rel_path for the rows that have one."""
    if root is None or REL_PATH not in rows or rows.empty:
        return rows
    rel = rows[REL_PATH].astype("string")
    has = rel.notna().to_numpy()
    if not has.any():
        return rows
    out = rows.copy()
    out["path"] = out["path"].astype(object)
    out.loc[has, "path"] = [str(root / r) for r in rel[has]]
    return out


def _sample(idx: IndexDir) -> list[str]:
    if REL_PATH not in idx.columns or idx.count == 0:
        return []
    rows = idx.fetch(idx.live_ids[: min(SAMPLE, idx.count)])
    return [str(r) for r in rows.get(REL_PATH, pd.Series(dtype="string")).dropna()]


def _holds(root: Path, sample: list[str]) -> bool:
    return bool(sample) and any((root / r).is_file() for r in sample)


def resolve_data_root(idx: IndexDir, override: str | Path | None = None) -> Path | None:
    """Where the indexed files are now (None for an index that stores absolute paths only).

    `override` (the user's --data-root) must hold the indexed files, else a one-line error.
    """
    m = idx.manifest
    if override is not None:
        root = Path(override).expanduser().resolve()
        if not root.is_dir():
            raise RetrieveError(f"--data-root {override}: no such folder")
        sample = _sample(idx)
        if not sample:
            if m.data_root is None:
                raise RetrieveError(
                    f"--data-root {override}: --index {idx.path} stores absolute paths (built before relocatable "
                    "indexes); rebuild it to move its data"
                )
            return root
        if not _holds(root, sample):
            raise RetrieveError(
                f"--data-root {override}: does not hold the indexed files (no {sample[0]} in it); "
                "give the folder the index was built from, as it is now"
            )
        return root
    if m.data_root is None:
        return None
    candidates = []
    if m.data_root_from_index:
        candidates.append((idx.path / m.data_root_from_index).resolve())
    candidates.append(Path(m.data_root))
    sample = _sample(idx)
    for c in candidates:
        if _holds(c, sample):
            return c
    if sample:
        log.warning(
            "--index %s: the data root %s no longer holds the indexed files; result paths will not open "
            "(pass --data-root, or `retrieve index relocate`)",
            idx.path,
            m.data_root,
        )
    return candidates[-1]


def relocate_index(index_dir: str | Path, new_root: str | Path) -> tuple[str | None, Path]:
    """Record `new_root` as the index's data root (it must hold the indexed files). Returns (old, new)."""
    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    idx = open_index_dir(index_dir, use_gpu=False)
    if m.data_root is None and not _sample(idx):
        raise RetrieveError(
            f"--index {index_dir}: stores absolute paths (built before relocatable indexes); rebuild it to move "
            "its data"
        )
    root = resolve_data_root(idx, new_root)
    assert root is not None  # an override always resolves to a folder
    old = set_data_root(index_dir, root)
    log.info("--index %s: data root %s -> %s", index_dir, old, root)
    return old, root


def rows_for_index(rows: pd.DataFrame, index_dir: str | Path) -> pd.DataFrame:
    """Rows about to be added to an index, with rel_path against that index's data root (where it records one)."""
    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    if m.data_root is None:
        return rows
    beside = (index_dir / m.data_root_from_index).resolve() if m.data_root_from_index else None
    root = beside if beside is not None and beside.is_dir() else Path(m.data_root)
    return with_rel_paths(rows, root)
