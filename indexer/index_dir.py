"""An index folder: a manifest that names a vectors file and a FAISS file, updated atomically.

Layout (format 2):

    DIR/manifest.json              the commit point: count, dim, encoder fingerprint, and the files
                                   of the current version with their size and SHA-256
    DIR/vectors-000003-ab12cd.parquet
    DIR/index-000003-ab12cd.faiss
    DIR/.lock                      held by writers (build, add)
    DIR/.retrieve-index            marks the folder as ours, even before its first commit

A write puts the new version's files beside the old ones under new names, then replaces
`manifest.json` with one rename (the single atomic step), then removes the files no manifest
names. A crash at any point leaves the old version or the new one, never none. Writers hold an
exclusive lock, so concurrent `index add` runs queue instead of losing rows; readers take no lock
and see one consistent version. Format 1 folders (`vectors.parquet`, `index.faiss`, no checksums)
are read as they are and move to format 2 on their next write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from indexer.atomic import atomic_path, fsync_dir
from indexer.config import IndexConfig
from indexer.errors import EncoderMismatchError, IndexBusyError, RetrieveError
from indexer.faiss_index import build_index, load_index, save_index
from indexer.fingerprint import fingerprint_difference
from indexer.store import VectorSet, read_vectors, write_vectors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
MARKER = ".retrieve-index"
FORMAT = 2
LEGACY_FILES = {"vectors": "vectors.parquet", "index": "index.faiss"}
VERSIONED = re.compile(r"^(vectors-\d{6}-[0-9a-f]{6}\.parquet|index-\d{6}-[0-9a-f]{6}\.faiss)$")
STALE_TMP = re.compile(r"^\.(vectors|index)[-.].*\.tmp$")
METRIC = "cosine (inner product on L2-normalised vectors)"
LOCK_TIMEOUT_ENV = "RETRIEVE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0
OPEN_RETRIES = 5


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrieve")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class IndexManifest:
    count: int
    dim: int
    metric: str
    kind: str
    params: dict[str, Any]
    fingerprint: dict[str, Any]
    encoder_spec: dict[str, Any]
    created: str
    updated: str
    labels: dict[str, int] = field(default_factory=dict)
    retrieve_version: str = field(default_factory=_version)
    faiss_version: str = faiss.__version__
    format: int = 1
    generation: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {name, size, sha256}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def file_name(self, role: str) -> str:
        """The current file of a role ('vectors' or 'index')."""
        return str(self.files[role]["name"]) if role in self.files else LEGACY_FILES[role]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _label_counts(rows: pd.DataFrame) -> dict[str, int]:
    labels = rows["label"].fillna("(unlabelled)") if "label" in rows else pd.Series(dtype=str)
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}


def _parse_manifest(path: Path) -> IndexManifest:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RetrieveError(f"{path}: damaged manifest ({str(exc).splitlines()[0]})") from None
    known = {f.name for f in fields(IndexManifest)}
    if not isinstance(raw, dict):
        raise RetrieveError(f"{path}: damaged manifest (not a JSON object)")
    try:
        m = IndexManifest(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise RetrieveError(f"{path}: not a retrieve index manifest ({exc})") from None
    if not isinstance(m.count, int) or not isinstance(m.dim, int) or not isinstance(m.fingerprint, dict):
        raise RetrieveError(f"{path}: damaged manifest (count, dim or fingerprint of the wrong type)")
    return m


def read_manifest(index_dir: str | Path) -> IndexManifest:
    index_dir = Path(index_dir)
    recover_leftovers(index_dir)
    if not index_dir.exists():
        raise RetrieveError(f"--index {index_dir}: no such index folder (build one with `retrieve index build`)")
    if not index_dir.is_dir():
        raise RetrieveError(f"--index {index_dir}: is a file, not an index folder")
    path = index_dir / MANIFEST
    if not path.is_file():
        if (index_dir / MARKER).exists():
            raise RetrieveError(
                f"--index {index_dir}: its first build was interrupted before it finished; build it again"
            )
        raise RetrieveError(f"--index {index_dir}: not an index folder ({MANIFEST} missing)")
    return _parse_manifest(path)


def is_index_folder(folder: Path) -> bool:
    """Ours: it holds our marker or a manifest that parses as an index manifest."""
    if (folder / MARKER).is_file():
        return True
    try:
        _parse_manifest(folder / MANIFEST)
        return True
    except RetrieveError:
        return False


# --- writers -------------------------------------------------------------------------------------


def lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        raise RetrieveError(f"{LOCK_TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None


@contextmanager
def write_lock(index_dir: Path, timeout: float | None = None) -> Iterator[None]:
    """Exclusive writer lock on an existing folder; a second writer waits, then fails with a clear message."""
    wait = lock_timeout() if timeout is None else timeout
    lock = FileLock(str(index_dir / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("--index %s: another process is writing to it; waiting up to %.0f s", index_dir, wait)
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            raise IndexBusyError(
                f"--index {index_dir}: another process has been writing to it for over {wait:.0f} s; "
                f"try again later (or raise {LOCK_TIMEOUT_ENV})"
            ) from None
    try:
        yield
    finally:
        lock.release()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}


def _commit(index_dir: Path, vs: VectorSet, index: faiss.Index, manifest: IndexManifest) -> None:
    """Write the new version's files, switch the manifest in one rename, then drop unreferenced files.

    The caller holds the write lock.
    """
    manifest.generation += 1
    tag = f"{manifest.generation:06d}-{secrets.token_hex(3)}"
    vectors_path = write_vectors(index_dir / f"vectors-{tag}.parquet", vs)
    index_path = index_dir / f"index-{tag}.faiss"
    save_index(index, index_path)
    manifest.format = FORMAT
    manifest.files = {"vectors": _describe(vectors_path), "index": _describe(index_path)}
    with atomic_path(index_dir / MANIFEST) as tmp:
        tmp.write_text(manifest.to_json(), encoding="utf-8")
    _collect_garbage(index_dir, manifest)


def _collect_garbage(index_dir: Path, manifest: IndexManifest) -> None:
    """Remove our files that the current manifest does not name (old versions, temporaries of a crash)."""
    keep = {manifest.file_name("vectors"), manifest.file_name("index")}
    for entry in index_dir.iterdir():
        name = entry.name
        ours = VERSIONED.match(name) or STALE_TMP.match(name) or name in LEGACY_FILES.values()
        if ours and name not in keep and entry.is_file():
            entry.unlink(missing_ok=True)
    fsync_dir(index_dir)


def recover_leftovers(index_dir: Path) -> None:
    """Finish what a crash of an older version's two-rename commit left behind, next to the index folder.

    `.NAME.building-*` (a complete or partial new version) and `.NAME.old-*` (the previous version):
    if the index folder itself is missing, the newest complete one of them takes its place; the rest
    are removed when they hold nothing but index files.
    """
    parent = index_dir.parent
    prefix = f".{index_dir.name}."
    try:
        leftovers = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return
    leftovers = [p for p in leftovers if p.name[len(prefix) :].startswith(("building-", "old-"))]
    if not leftovers:
        return
    if not (index_dir / MANIFEST).is_file() and not (index_dir.exists() and any(index_dir.iterdir())):
        complete = [p for p in leftovers if _complete(p)]
        complete.sort(key=lambda p: (p.name[len(prefix) :].startswith("building-"), p.stat().st_mtime))
        if complete:
            best = complete[-1]
            if index_dir.exists():
                index_dir.rmdir()
            os.replace(best, index_dir)
            log.warning("--index %s: restored from %s, left by an interrupted write", index_dir, best.name)
            leftovers.remove(best)
    for p in leftovers:
        if all(f.name in (MANIFEST, *LEGACY_FILES.values()) or f.name.endswith(".tmp") for f in p.iterdir()):
            shutil.rmtree(p, ignore_errors=True)


def _complete(folder: Path) -> bool:
    try:
        m = _parse_manifest(folder / MANIFEST)
    except RetrieveError:
        return False
    return all((folder / m.file_name(role)).is_file() for role in LEGACY_FILES)


def check_can_build(index_dir: Path, overwrite: bool, data: Path | None = None) -> None:
    """Refuse before any expensive work: a foreign folder, the data's own folder, the working folder.

    `--overwrite` replaces only a retrieve index, and even then only our own files in it.
    """
    index_dir = Path(index_dir)
    recover_leftovers(index_dir)
    if not index_dir.exists():
        return
    if not index_dir.is_dir():
        raise RetrieveError(f"--index {index_dir}: is a file; give a folder for the index")
    target = index_dir.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise RetrieveError(f"--index {index_dir}: is the current folder or holds it; give a folder of its own")
    if data is not None:
        source = Path(data).resolve()
        if source == target or target in source.parents or source in target.parents:
            raise RetrieveError(
                f"--index {index_dir}: overlaps the data being indexed ({data}); give a separate folder"
            )
    if not any(p.name != LOCK for p in index_dir.iterdir()):
        return
    if not is_index_folder(index_dir):
        raise RetrieveError(
            f"--index {index_dir}: exists and is not a retrieve index folder; give a new or empty folder"
        )
    if (index_dir / MANIFEST).is_file() and not overwrite:
        raise RetrieveError(
            f"--index {index_dir}: already exists; pass --overwrite to rebuild it or use `retrieve index add`"
        )


def build_index_dir(
    index_dir: str | Path, vs: VectorSet, cfg: IndexConfig, overwrite: bool = False, data: Path | None = None
) -> IndexManifest:
    """Build a new index (or a new version replacing an existing index, with `overwrite`)."""
    index_dir = Path(index_dir)
    if len(vs) == 0:
        raise RetrieveError("no vectors to index")
    check_can_build(index_dir, overwrite, data)
    index, kind, params = build_index(vs.vectors, cfg.kind, cfg, use_gpu=cfg.gpu)
    index_dir.mkdir(parents=True, exist_ok=True)
    with write_lock(index_dir):
        check_can_build(index_dir, overwrite, data)  # again, now that no other writer can change it
        marker = index_dir / MARKER
        if not marker.exists():
            with atomic_path(marker) as tmp:
                tmp.write_text("a retrieve index folder: see manifest.json\n", encoding="utf-8")
        generation = 0
        if (index_dir / MANIFEST).is_file():
            generation = _parse_manifest(index_dir / MANIFEST).generation
        now = _now()
        manifest = IndexManifest(
            count=len(vs),
            dim=vs.dim,
            metric=METRIC,
            kind=kind,
            params=params,
            fingerprint=vs.fingerprint,
            encoder_spec=vs.encoder_spec,
            created=now,
            updated=now,
            labels=_label_counts(vs.rows),
            generation=generation,
        )
        _commit(index_dir, vs, index, manifest)
    return manifest


# --- readers -------------------------------------------------------------------------------------


@dataclass
class IndexDir:
    """A loaded index directory."""

    path: Path
    manifest: IndexManifest
    vectors: VectorSet
    index: faiss.Index

    @property
    def rows(self) -> pd.DataFrame:
        return self.vectors.rows


def file_problems(index_dir: Path, m: IndexManifest, checksums: bool = False) -> list[str]:
    """What is wrong with the files the manifest names: missing, wrong size, (with checksums) changed."""
    problems = []
    for role in LEGACY_FILES:
        path = index_dir / m.file_name(role)
        if not path.is_file():
            problems.append(f"{path.name}: missing")
            continue
        expected = m.files.get(role)
        if expected is None:
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{path.name}: {size} bytes, the manifest says {expected['size']}")
        elif checksums and _sha256(path) != expected["sha256"]:
            problems.append(f"{path.name}: content changed since it was written (SHA-256 differs)")
    return problems


class _VersionSwitched(Exception):
    """A writer committed a new version while we were reading the old one."""


def _load(index_dir: Path, manifest: IndexManifest, use_gpu: bool) -> IndexDir:
    problems = file_problems(index_dir, manifest)
    if problems:
        raise RetrieveError(f"--index {index_dir}: damaged ({'; '.join(problems)}); rebuild it")
    vs = read_vectors(index_dir / manifest.file_name("vectors"))
    index = load_index(index_dir / manifest.file_name("index"), use_gpu)
    if index.d != manifest.dim or vs.dim != manifest.dim:
        raise RetrieveError(
            f"--index {index_dir}: damaged (FAISS index of {index.d}-d, vectors of {vs.dim}-d, "
            f"manifest says {manifest.dim}-d); rebuild it"
        )
    if index.ntotal != len(vs) or manifest.count != len(vs):
        raise RetrieveError(
            f"--index {index_dir}: inconsistent ({len(vs)} vectors, {index.ntotal} in the FAISS index, "
            f"manifest says {manifest.count}); rebuild it"
        )
    return IndexDir(index_dir, manifest, vs, index)


def _open_once(index_dir: Path, use_gpu: bool) -> IndexDir:
    manifest = read_manifest(index_dir)
    try:
        return _load(index_dir, manifest, use_gpu)
    except RetrieveError:
        try:
            switched = read_manifest(index_dir) != manifest
        except RetrieveError:
            switched = False
        if switched:
            raise _VersionSwitched from None
        raise


def open_index_dir(index_dir: str | Path, use_gpu: bool = True) -> IndexDir:
    """Load the current version; a version switched by a writer while we read is simply read again."""
    index_dir = Path(index_dir)
    for _ in range(OPEN_RETRIES):
        try:
            return _open_once(index_dir, use_gpu)
        except _VersionSwitched:
            continue
    raise RetrieveError(f"--index {index_dir}: kept changing while being read; try again")


def verify_index_dir(index_dir: str | Path) -> list[str]:
    """Every check: manifest, file sizes and SHA-256, both files load, counts and dimensions agree."""
    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    problems = file_problems(index_dir, m, checksums=True)
    if not m.files:
        problems.append("no checksums recorded (format 1 index); any `index add` or a rebuild records them")
    if any(not p.startswith("no checksums") for p in problems):
        return problems
    try:
        _load(index_dir, m, use_gpu=False)
    except RetrieveError as exc:
        problems.append(str(exc))
    return problems


def check_compatible(fingerprint: dict[str, Any], other: dict[str, Any], what: str) -> None:
    diff = fingerprint_difference(fingerprint, other)
    if diff:
        raise EncoderMismatchError(
            f"{what}: built with encoder {fingerprint.get('encoder')}, not {other.get('encoder')}: {diff}"
        )


def add_to_index_dir(index_dir: str | Path, new: VectorSet) -> tuple[IndexManifest, int]:
    """Append vectors without a rebuild: existing vectors stay, the FAISS index gets `add`ed to.

    Rows whose path and frame are already indexed are left out. Returns (manifest, rows added).
    The whole read-merge-write runs under the writer lock, so concurrent adds all land.
    """
    index_dir = Path(index_dir)
    read_manifest(index_dir)  # one-line errors for a missing or foreign folder before taking a lock
    with write_lock(index_dir):
        idx = open_index_dir(index_dir, use_gpu=False)
        check_compatible(idx.manifest.fingerprint, new.fingerprint, f"--index {index_dir}")
        old_rows = idx.rows

        def key(df: pd.DataFrame) -> pd.Series:
            return df["path"].astype(str) + "#" + df["frame_index"].astype("string").fillna("")

        fresh = ~key(new.rows).isin(set(key(old_rows)))
        rows = new.rows.loc[fresh].reset_index(drop=True)
        vectors = new.vectors[fresh.to_numpy()]
        if len(rows) == 0:
            return idx.manifest, 0
        taken = set(old_rows["id"])
        clash = rows["id"].isin(taken)
        if clash.any():  # same relative id from another folder: qualify it with the absolute path
            suffix = rows.loc[clash, "id"].str.extract(r"(#\d+)$", expand=False).fillna("")
            rows.loc[clash, "id"] = rows.loc[clash, "path"].astype(str) + suffix
        idx.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        merged = VectorSet(
            rows=pd.concat([old_rows, rows], ignore_index=True),
            vectors=np.vstack([idx.vectors.vectors, vectors]),
            fingerprint=idx.manifest.fingerprint,
            encoder_spec=idx.manifest.encoder_spec,
        )
        m = idx.manifest
        m.count, m.updated, m.labels = len(merged), _now(), _label_counts(merged.rows)
        _commit(index_dir, merged, idx.index, m)
    return m, len(rows)
