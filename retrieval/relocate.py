"""Relocatable indexes: each row stores its file's path relative to the data root the manifest records.

The manifest records the data root twice: as an absolute path and as a path relative to the index
folder. Where the files are now is, in this order: the root the caller names (`--data-root`, which must
hold the files), the recorded root relative to the index (a folder holding data and index moved as
one), the recorded absolute root. Indexes built before this (absolute paths, no recorded root) are read
as they are. `relocate_index` records a new root under the index's write lock, atomically.
"""

from __future__ import annotations

import logging
import os
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
    sample = _sample(idx)
    found = _recorded_root(idx, sample)
    if found is not None:
        return found
    if sample:
        log.warning(
            "--index %s: the data root %s no longer holds the indexed files; result paths will not open "
            "(pass --data-root, or `retrieve index relocate`)",
            idx.path,
            m.data_root,
        )
    return Path(m.data_root)


def _beside(idx: IndexDir) -> Path | None:
    """The recorded root relative to the index folder, where it is now (None if not recorded)."""
    rel = idx.manifest.data_root_from_index
    return (idx.path / rel).resolve() if rel else None


def _recorded_root(idx: IndexDir, sample: list[str]) -> Path | None:
    """The recorded root that holds the indexed files: beside the index first (data and index moved
    together), then the absolute one; None when neither holds a sampled file (or there is no sample)."""
    for c in (_beside(idx), idx.manifest.data_root):
        if c is not None and _holds(Path(c), sample):
            return Path(c)
    return None


def missing_files(idx: IndexDir, root: Path) -> tuple[int, int, str | None]:
    """(missing, checked, first missing rel_path): every live row's file under `root`, one stat each
    (rows outside the data root, without rel_path, are not moved and not checked)."""
    if REL_PATH not in idx.columns or idx.count == 0:
        return 0, 0, None
    rels = idx.read_columns([REL_PATH])[REL_PATH].dropna().astype(str).unique()
    root_text = os.fspath(root)
    missing = [r for r in rels if not os.path.isfile(os.path.join(root_text, r))]
    return len(missing), len(rels), (missing[0] if missing else None)


def relocate_index(index_dir: str | Path, new_root: str | Path) -> tuple[str | None, Path]:
    """Record `new_root` as the index's data root; it must hold every indexed file (each one is checked,
    not a sample: 0.4 s per 100,000 files on a warm local disk). Returns (old, new)."""
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
    n_missing, n_files, first = missing_files(idx, root)
    if n_missing:
        raise RetrieveError(
            f"--data-root {new_root}: {n_missing} of the {n_files} indexed files are not in it (first: {first}); "
            "give the folder that holds them all, or take the missing ones out first (`retrieve index remove "
            "--path`)"
        )
    old = set_data_root(index_dir, root)
    log.debug("--index %s: data root %s -> %s", index_dir, old, root)  # the command prints it
    return old, root


def rows_for_index(rows: pd.DataFrame, index_dir: str | Path) -> pd.DataFrame:
    """Rows about to be added to an index, named as its own rows are (where it records a data root).

    rel_path is each file's path relative to where the index's data root is now (as queries resolve it:
    beside the index, then the recorded absolute root), so `add_to_index_dir` knows an image it holds
    wherever index and data were moved, and the id of a row under the root is that rel_path (with its
    `#frame`), as a build names it, whatever sub-folder was added. A file outside the root is named by its
    absolute path (id and path; rel_path null), as a build names one. If no recorded root holds the indexed files
    (the data moved without `index relocate`), the added files' own folder or the nearest folder above it
    that holds them stands in, with a warning; failing that the recorded root.
    """
    index_dir = Path(index_dir)
    if read_manifest(index_dir).data_root is None:
        return rows  # absolute paths only (built before relocatable indexes): matched by path
    idx = open_index_dir(index_dir, use_gpu=False)
    sample = _sample(idx)
    root = _recorded_root(idx, sample)
    if root is None and not sample:  # nothing to check a folder by (no row under the root)
        beside = _beside(idx)
        root = beside if beside is not None and beside.is_dir() else Path(str(idx.manifest.data_root))
    if root is None:
        root = _holding_folder(rows, sample)
        if root is not None:
            log.warning(
                "--index %s: the data root %s no longer holds the indexed files, %s does: the new images are "
                "matched against it (record it with `retrieve index relocate --index %s --data-root %s`)",
                index_dir,
                idx.manifest.data_root,
                root,
                index_dir,
                root,
            )
        else:
            root = Path(str(idx.manifest.data_root))
    out = with_rel_paths(rows, root)
    return _ids_as_built(out)


def _holding_folder(rows: pd.DataFrame, sample: list[str]) -> Path | None:
    """The added files' common folder or the nearest folder above it that holds the sampled indexed files."""
    paths = [str(p) for p in rows["path"] if Path(str(p)).is_absolute()]
    if not paths or not sample:
        return None
    try:
        common = Path(os.path.commonpath(paths))
    except ValueError:
        return None
    for folder in (common, *common.parents):
        if _holds(folder, sample):
            return folder
    return None


def _ids_as_built(rows: pd.DataFrame) -> pd.DataFrame:
    """Each row's id as a build names it: its rel_path, or for a file outside the root its absolute path,
    plus the `#frame` its id carried."""
    if rows.empty:
        return rows
    frames = rows["frame_index"] if "frame_index" in rows else pd.Series(pd.NA, index=rows.index)
    rel = rows[REL_PATH].astype("string") if REL_PATH in rows else pd.Series(pd.NA, index=rows.index, dtype="string")

    def suffix(row_id: object, frame: object) -> str:
        if frame is None or pd.isna(frame):
            return ""
        tail = f"#{int(frame)}"  # type: ignore[call-overload]
        return tail if str(row_id).endswith(tail) else ""

    out = rows.copy()
    out["id"] = [
        f"{p if pd.isna(r) else r}{suffix(i, f)}"
        for r, p, i, f in zip(rel, rows["path"].astype(str), rows["id"], frames, strict=True)
    ]
    return out
