"""An index folder: a manifest naming Parquet shards and a FAISS file, updated atomically.

Layout (format 2):

    DIR/manifest.json              the commit point: count, dim, encoder fingerprint, the shards and
                                   the FAISS file of the current version (size, SHA-256), next row id,
                                   removed row ids not yet compacted
    DIR/shard-000001-ab12cd.parquet    rows with a stable int64 row_id and their vectors
    DIR/shard-000002-9f00e1.parquet    (`index add` appends a shard; existing shards are never rewritten)
    DIR/index-000002-9f00e1.faiss      FAISS over the vectors, keyed by row_id (IndexIDMap2 or IVF ids)
    DIR/lists-0a1b2c3d4e5f.ivfdata     an on-disk IVF's lists, memory-mapped (`--on-disk`, indexer/ondisk.py)
    DIR/.lock                      held by writers (build, add, remove, compact)
    DIR/.retrieve-index            marks the folder as ours, even before its first commit

A write puts the new version's files beside the old ones under new names, then replaces
`manifest.json` with one rename (the single atomic step), then removes the files no manifest
names. A crash at any point leaves the old version or the new one, never none. Writers hold an
exclusive lock, so concurrent `index add` runs queue instead of losing rows; readers take no lock
and see one consistent version. A query reads the FAISS file and then only the row groups of its
results. Format 1 folders (`vectors.parquet`, `index.faiss`, row positions as ids, no checksums)
are read as they are and move to format 2 on their next write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from indexer.atomic import atomic_path, fsync_dir
from indexer.config import IndexConfig
from indexer.errors import (
    ENVIRONMENT_ERRNOS,
    EncoderMismatchError,
    IndexBusyError,
    RetrieveError,
    StorageError,
    errno_reason,
)
from indexer.faiss_index import (
    build_index,
    fill_index,
    has_ids,
    inner,
    load_index,
    new_index,
    save_index,
    search_device,
)
from indexer.fingerprint import fingerprint_difference
from indexer.ondisk import ON_DISK, add_vectors, lists_on_disk, to_disk
from indexer.shards import ROW_GROUP, ROW_ID, Shard, ShardReader, write_shard
from indexer.store import VECTOR_COLUMN, VectorSet, vectors_from_table

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
MARKER = ".retrieve-index"
FORMAT = 2
LEGACY_FILES = {"vectors": "vectors.parquet", "index": "index.faiss"}
VERSIONED = re.compile(
    r"^(shard-\d{6}-[0-9a-f]{6}(-\d{4})?\.parquet|index-\d{6}-[0-9a-f]{6}\.faiss|lists-[0-9a-f]{12}\.ivfdata)$"
)
STALE_TMP = re.compile(r"^\.(shard-|index-|part-|vectors|manifest\.json|build\.json|\.retrieve-index).*\.tmp$")
PART = re.compile(r"^part-[0-9a-f]{8}-\d{5}\.parquet$")  # shards of a streaming build (indexer/streaming.py)
SHARD_ROWS = 100_000  # rows per shard when a build writes many
TRAIN_SAMPLE = 100_000  # vectors that train an IVF quantiser (streaming build, compact)
CHUNK_BYTES = 64 * 2**20  # vectors of one part shard of a streaming build or compact (65,536 rows at 256-d)
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
    next_id: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)  # {name, rows, id_min, id_max, size, sha256}
    index_file: dict[str, Any] = field(default_factory=dict)  # {name, size, sha256}
    lists_file: dict[str, Any] = field(default_factory=dict)  # {name, size, sha256} of on-disk IVF lists, if any
    removed: list[int] = field(default_factory=list)  # row ids removed but still in shards (until compact)
    data_root: str | None = None  # where the indexed files were (absolute); rows keep paths relative to it
    data_root_from_index: str | None = None  # the same folder relative to the index folder (moved together)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @property
    def legacy(self) -> bool:
        return self.format < 2

    def index_name(self) -> str:
        return str(self.index_file["name"]) if self.index_file else LEGACY_FILES["index"]

    def shard_list(self, index_dir: Path) -> list[Shard]:
        if self.legacy:
            return [Shard(index_dir / LEGACY_FILES["vectors"], self.count, 0, self.count - 1, legacy=True)]
        return [
            Shard(index_dir / sh["name"], int(sh["rows"]), int(sh["id_min"]), int(sh["id_max"])) for sh in self.shards
        ]

    def file_names(self) -> list[str]:
        if self.legacy:
            return list(LEGACY_FILES.values())
        lists = [str(self.lists_file["name"])] if self.lists_file else []
        return [str(sh["name"]) for sh in self.shards] + [self.index_name()] + lists


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
    required = [f.name for f in fields(IndexManifest) if f.default is MISSING and f.default_factory is MISSING]
    absent = [k for k in required if k not in raw]
    if absent:  # someone else's manifest.json: say which of our fields it lacks, not Python's TypeError text
        shown = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise RetrieveError(f"{path}: not a retrieve index manifest (it has no {shown})")
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
    except OSError as exc:  # a read-only folder or file system (filelock's Timeout is an OSError too: above)
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        reason = errno_reason(exc.errno)
        raise StorageError(f"--index {index_dir}: cannot take its write lock {LOCK}: {reason}") from None
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
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _tag(manifest: IndexManifest) -> str:
    return f"{manifest.generation:06d}-{secrets.token_hex(3)}"


def _write_shards(index_dir: Path, vs: VectorSet, first_id: int, tag: str) -> list[dict[str, Any]]:
    """The rows as shards of at most SHARD_ROWS rows, ids first_id, first_id + 1, ..."""
    out = []
    for k, start in enumerate(range(0, len(vs), SHARD_ROWS)):
        part = VectorSet(
            vs.rows.iloc[start : start + SHARD_ROWS].reset_index(drop=True),
            vs.vectors[start : start + SHARD_ROWS],
            vs.fingerprint,
            vs.encoder_spec,
        )
        ids = np.arange(first_id + start, first_id + start + len(part), dtype=np.int64)
        suffix = "" if len(vs) <= SHARD_ROWS else f"-{k:04d}"
        path = index_dir / f"shard-{tag}{suffix}.parquet"
        out.append({**write_shard(path, part, ids), **_describe(path)})
    return out


def _commit(index_dir: Path, manifest: IndexManifest, index: faiss.Index | None, tag: str) -> None:
    """Save the FAISS file (when it changed), switch the manifest in one rename, drop unreferenced files.

    The caller holds the write lock and has written any new shards.
    """
    if index is not None:
        if manifest.params.get("lists") == ON_DISK and lists_on_disk(index) is None:
            to_disk(index, index_dir)  # built in memory (build, compact): its lists into a new lists file
        index_path = index_dir / f"index-{tag}.faiss"
        save_index(index, index_path)
        manifest.index_file = {"name": index_path.name, **_describe(index_path)}
        lists = lists_on_disk(index)
        lists_path = index_dir / str(lists.filename) if lists is not None else None
        if lists_path is None:
            manifest.lists_file = {}
        elif manifest.lists_file.get("name") != lists_path.name:  # a new lists file (an unchanged one is kept)
            manifest.lists_file = {"name": lists_path.name, **_describe(lists_path)}
    manifest.format = FORMAT
    with atomic_path(index_dir / MANIFEST) as tmp:
        tmp.write_text(manifest.to_json(), encoding="utf-8")
    _collect_garbage(index_dir, manifest)


def _resumable_parts(index_dir: Path) -> set[str]:
    """The parts an interrupted streaming build (`build.json`, streaming.STATE) can resume from; when its state
    cannot be read, every part (nothing a resume might need is ever removed)."""
    state = index_dir / "build.json"
    if not state.exists():
        return set()
    try:
        return {str(p["name"]) for p in json.loads(state.read_text(encoding="utf-8"))["parts"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {p.name for p in index_dir.glob("part-*.parquet")}


def _collect_garbage(index_dir: Path, manifest: IndexManifest) -> None:
    """Remove our files that the current manifest does not name (old versions, temporaries of a crash)."""
    keep = set(manifest.file_names()) | _resumable_parts(index_dir)
    for entry in index_dir.iterdir():
        name = entry.name
        ours = bool(VERSIONED.match(name) or STALE_TMP.match(name) or name in LEGACY_FILES.values() or PART.match(name))
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
    return all((folder / name).is_file() for name in m.file_names())


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
    if all(p.name == LOCK or STALE_TMP.match(p.name) for p in index_dir.iterdir()):  # empty, or a killed start
        return
    if not is_index_folder(index_dir):
        raise RetrieveError(
            f"--index {index_dir}: exists and is not a retrieve index folder; give a new or empty folder"
        )
    if (index_dir / MANIFEST).is_file() and not overwrite:
        raise RetrieveError(
            f"--index {index_dir}: already exists; pass --overwrite to rebuild it or use `retrieve index add`"
        )


def mark_as_index(index_dir: Path) -> None:
    """The marker that makes a folder ours before its first commit (so an interrupted build may be redone)."""
    marker = index_dir / MARKER
    if not marker.exists():
        with atomic_path(marker) as tmp:
            tmp.write_text("a retrieve index folder: see manifest.json\n", encoding="utf-8")


def new_manifest(
    index_dir: Path,
    count: int,
    dim: int,
    kind: str,
    params: dict[str, Any],
    fingerprint: dict[str, Any],
    encoder_spec: dict[str, Any],
    rows: pd.DataFrame,
) -> IndexManifest:
    """The manifest of a freshly built index (ids 0..count-1), one generation past any index it replaces."""
    old = index_dir / MANIFEST
    generation = _parse_manifest(old).generation if old.is_file() else 0
    now = _now()
    return IndexManifest(
        count=count,
        dim=dim,
        metric=METRIC,
        kind=kind,
        params=params,
        fingerprint=fingerprint,
        encoder_spec=encoder_spec,
        created=now,
        updated=now,
        labels=_label_counts(rows),
        generation=generation + 1,
        next_id=count,
    )


def build_index_dir(
    index_dir: str | Path, vs: VectorSet, cfg: IndexConfig, overwrite: bool = False, data: Path | None = None
) -> IndexManifest:
    """Build a new index (or a new version replacing an existing index, with `overwrite`)."""
    index_dir = Path(index_dir)
    if len(vs) == 0:
        raise RetrieveError("no vectors to index")
    if vs.fingerprint.get("dim") not in (None, vs.dim):
        raise RetrieveError(f"vectors are {vs.dim}-d but their encoder fingerprint says {vs.fingerprint['dim']}-d")
    check_can_build(index_dir, overwrite, data)
    index, kind, params = build_index(vs.vectors, cfg.kind, cfg, use_gpu=cfg.gpu)
    index_dir.mkdir(parents=True, exist_ok=True)
    with write_lock(index_dir):
        check_can_build(index_dir, overwrite, data)  # again, now that no other writer can change it
        mark_as_index(index_dir)
        manifest = new_manifest(index_dir, len(vs), vs.dim, kind, params, vs.fingerprint, vs.encoder_spec, vs.rows)
        tag = _tag(manifest)
        manifest.shards = _write_shards(index_dir, vs, 0, tag)
        _commit(index_dir, manifest, index, tag)
    return manifest


# --- readers -------------------------------------------------------------------------------------


class IndexDir:
    """An opened index version: the FAISS index in memory, the rows read from the shards on demand.

    `rows` and `vectors` (every live row, in id order; "position" means a place in that order) load
    the whole store, which browsing and evaluation need; a query needs only `fetch` and `live_ids`.
    """

    def __init__(self, path: Path, manifest: IndexManifest, index: faiss.Index):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.search_device = search_device(index)  # "cpu" or "gpu:N"; set by each search to where it ran
        self.reader = ShardReader(manifest.shard_list(path))
        self.removed = np.asarray(sorted(manifest.removed), dtype=np.int64)
        self._live_ids: np.ndarray | None = None
        self._vectors: VectorSet | None = None
        self._columns: list[str] | None = None

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def live_ids(self) -> np.ndarray:
        """Row ids of the live rows, sorted (position -> id)."""
        if self._live_ids is None:
            ids = self.reader.all_ids()
            self._live_ids = ids[~np.isin(ids, self.removed)] if len(self.removed) else ids
        return self._live_ids

    def positions(self, row_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.live_ids, np.asarray(row_ids, dtype=np.int64))

    @property
    def columns(self) -> list[str]:
        """The row columns (metadata included) of this index."""
        if self._columns is None:
            names: list[str] = []
            for s in range(len(self.reader.shards)):
                names += [c for c in self.reader.row_columns(s) if c not in names]
            self._columns = names
        return self._columns

    def _stored_live(self) -> np.ndarray | None:
        """Mask over stored rows (shard order) of the live ones; None when nothing was removed."""
        if not len(self.removed):
            return None
        return ~np.isin(self.reader.all_ids(), self.removed)

    def read_columns(self, columns: list[str]) -> pd.DataFrame:
        """Some row columns for every live row, in position order (no vectors read)."""
        rows, _ = self.reader.read(columns=columns)
        keep = self._stored_live()
        return (rows if keep is None else rows.loc[keep]).reset_index(drop=True)

    @property
    def vectors(self) -> VectorSet:
        """Every live row with its vector (loads the whole store once)."""
        if self._vectors is None:
            rows, vecs = self.reader.read(vectors=True)
            if vecs is None:  # no shard at all: an index compacted after every row was removed
                vecs = np.zeros((0, self.manifest.dim), dtype=np.float32)
            keep = self._stored_live()
            if keep is not None:
                rows, vecs = rows.loc[keep].reset_index(drop=True), vecs[keep]
            self._vectors = VectorSet(rows, vecs, self.manifest.fingerprint, self.manifest.encoder_spec)
        return self._vectors

    @property
    def rows(self) -> pd.DataFrame:
        return self.vectors.rows

    def fetch(self, row_ids: list[int] | np.ndarray) -> pd.DataFrame:
        """The rows of some ids, in that order, reading only the row groups that hold them."""
        rows, _ = self.reader.fetch([int(i) for i in row_ids])
        return rows.drop(columns=[ROW_ID], errors="ignore")


def file_problems(index_dir: Path, m: IndexManifest, checksums: bool = False) -> list[str]:
    """What is wrong with the files the manifest names: missing, wrong size, (with checksums) changed."""
    problems = []
    expected = {str(sh["name"]): sh for sh in m.shards}
    if m.index_file:
        expected[str(m.index_file["name"])] = m.index_file
    if m.lists_file:
        expected[str(m.lists_file["name"])] = m.lists_file
    for name in m.file_names():
        path = index_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        want = expected.get(name)
        if want is None or "size" not in want:
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {want['size']}")
        elif checksums and _sha256(path) != want["sha256"]:
            problems.append(f"{name}: content changed since it was written (SHA-256 differs)")
    return problems


class _VersionSwitched(Exception):
    """A writer committed a new version while we were reading the old one."""


def _load(index_dir: Path, manifest: IndexManifest, use_gpu: bool, deep: bool = False, mmap: bool = True) -> IndexDir:
    problems = file_problems(index_dir, manifest)
    if problems:
        raise RetrieveError(f"--index {index_dir}: damaged ({'; '.join(problems)}); rebuild it")
    lists = index_dir / str(manifest.lists_file["name"]) if manifest.lists_file else None
    index = load_index(index_dir / manifest.index_name(), use_gpu, mmap=mmap, params=manifest.params, lists=lists)
    stored = sum(s.rows for s in manifest.shard_list(index_dir))
    faiss_count = stored if manifest.params.get("removal") == "tombstone" else manifest.count
    if index.d != manifest.dim:
        raise RetrieveError(
            f"--index {index_dir}: damaged (FAISS index of {index.d}-d, manifest says {manifest.dim}-d); rebuild it"
        )
    if not manifest.legacy and not has_ids(index):
        raise RetrieveError(f"--index {index_dir}: damaged (FAISS index of the wrong layout); rebuild it")
    if index.ntotal != faiss_count or stored - len(set(manifest.removed)) != manifest.count:
        raise RetrieveError(
            f"--index {index_dir}: inconsistent ({stored} stored rows, {len(manifest.removed)} removed, "
            f"{index.ntotal} in the FAISS index, manifest says {manifest.count}); rebuild it"
        )
    idx = IndexDir(index_dir, manifest, index)
    if deep:
        vs = idx.vectors
        if vs.dim != manifest.dim or len(vs) != manifest.count:
            raise RetrieveError(
                f"--index {index_dir}: damaged ({len(vs)} rows of {vs.dim}-d vectors in the shards, "
                f"manifest says {manifest.count} of {manifest.dim}-d); rebuild it"
            )
    return idx


def _open_once(index_dir: Path, use_gpu: bool, writable: bool) -> IndexDir:
    manifest = read_manifest(index_dir)
    try:
        return _load(index_dir, manifest, use_gpu, mmap=not writable)
    except RetrieveError:
        try:
            switched = read_manifest(index_dir) != manifest
        except RetrieveError:
            switched = False
        if switched:
            raise _VersionSwitched from None
        raise


def open_index_dir(index_dir: str | Path, use_gpu: bool = True, writable: bool = False) -> IndexDir:
    """Load the current version; a version switched by a writer while we read is simply read again.

    Readers get the FAISS vectors memory-mapped (no load time, no copy in memory); `writable` loads a
    copy that can be changed (the writers: add, remove, compact).
    """
    index_dir = Path(index_dir)
    for _ in range(OPEN_RETRIES):
        try:
            return _open_once(index_dir, use_gpu, writable)
        except _VersionSwitched:
            continue
    raise RetrieveError(f"--index {index_dir}: kept changing while being read; try again")


def verify_index_dir(index_dir: str | Path) -> list[str]:
    """Every check: manifest, file sizes and SHA-256, all files load, counts and dimensions agree."""
    index_dir = Path(index_dir)
    m = read_manifest(index_dir)
    problems = file_problems(index_dir, m, checksums=True)
    if m.legacy:
        problems.append("no checksums recorded (format 1 index); any `index add` or a rebuild records them")
    if any(not p.startswith("no checksums") for p in problems):
        return problems
    try:
        _load(index_dir, m, use_gpu=False, deep=True, mmap=False)
    except RetrieveError as exc:
        problems.append(str(exc))
    return problems


def set_data_root(index_dir: str | Path, root: str | Path, lock: bool = True) -> str | None:
    """Record the data root (absolute, and relative to the index folder) in one atomic manifest write.

    Under the write lock, unless the caller holds it already (`lock=False`). Returns the previous root.
    """
    index_dir = Path(index_dir)
    read_manifest(index_dir)
    with write_lock(index_dir) if lock else contextlib.nullcontext():
        m = read_manifest(index_dir)
        old = m.data_root
        m.data_root = str(Path(root).resolve())
        m.data_root_from_index = Path(os.path.relpath(m.data_root, index_dir.resolve())).as_posix()
        m.updated = _now()
        with atomic_path(index_dir / MANIFEST) as tmp:
            tmp.write_text(m.to_json(), encoding="utf-8")
    return old


def check_compatible(fingerprint: dict[str, Any], other: dict[str, Any], what: str) -> None:
    diff = fingerprint_difference(fingerprint, other)
    if diff:
        raise EncoderMismatchError(
            f"{what}: built with encoder {fingerprint.get('encoder')}, not {other.get('encoder')}: {diff}"
        )


def _upgrade(index_dir: Path, idx: IndexDir, tag: str) -> IndexManifest:
    """A format 1 index as format 2: its rows become one shard with ids 0..N-1, its FAISS file gets ids."""
    m = idx.manifest
    vs = idx.vectors
    cfg = IndexConfig(kind=m.kind, gpu=False)
    index, _, params = build_index(vs.vectors, m.kind, cfg, use_gpu=False)
    m.params = {**m.params, **{k: v for k, v in params.items() if k in ("removal",)}}
    m.shards = _write_shards(index_dir, vs, 0, tag)
    m.next_id = len(vs)
    idx.index, idx.manifest = index, m
    m.format = FORMAT
    return m


def _keep_old_labels(
    rows: pd.DataFrame, row_keys: list[pd.Series], old: pd.DataFrame, old_keys: pd.Series
) -> pd.DataFrame:
    """Re-embedded rows that come without a label keep the label of the row they replace: a sub-folder of a
    class-folder dataset (`index add DATA/severe --replace`) carries no class of its own, and an upsert of
    vectors must not erase what a person labelled."""
    labelled = old["label"].notna().to_numpy()
    by_key = dict(zip(old_keys[labelled], old["label"][labelled]))
    have = rows["label"] if "label" in rows.columns else pd.Series(pd.NA, index=rows.index, dtype=object)
    carried = have.copy()
    for keys in row_keys:  # by rel_path first, then by path
        carried = carried.where(carried.notna(), keys.map(by_key))
    kept = int(carried.notna().sum() - have.notna().sum())
    if kept:
        log.info("%d replaced row(s) without a label keep their old label", kept)
    return rows.assign(label=carried)


def add_to_index_dir(index_dir: str | Path, new: VectorSet, replace: bool = False) -> tuple[IndexManifest, int]:
    """Append vectors as a new shard; existing shards stay as they are, FAISS gets `add_with_ids`.

    Rows already indexed are left out, or with `replace` the old rows are removed and the new ones added
    (upsert of re-embedded images). Returns (manifest, rows added). An image is known by its frame and,
    where the new rows carry rel_path (paths relative to where the index's data root is now:
    retrieval.relocate.rows_for_index), by its rel_path, so an index moved with or apart from its data
    still knows its images; rows without one (files outside the root, indexes that record no root) by
    their absolute path. The whole read-merge-write runs under the writer lock, so concurrent adds all land.
    """
    index_dir = Path(index_dir)
    read_manifest(index_dir)  # one-line errors for a missing or foreign folder before taking a lock
    with write_lock(index_dir):
        idx = open_index_dir(index_dir, use_gpu=False, writable=True)
        check_compatible(idx.manifest.fingerprint, new.fingerprint, f"--index {index_dir}")
        if new.dim != idx.manifest.dim:
            raise EncoderMismatchError(f"--index {index_dir}: holds {idx.manifest.dim}-d vectors, not {new.dim}-d")
        rel_path = "rel_path"  # retrieval.relocate.REL_PATH: relative to the data root, null outside it
        by_rel = rel_path in new.rows.columns and rel_path in idx.columns
        keep_labels = replace and "label" in idx.columns
        old = idx.read_columns(
            ["id", "path", "frame_index"] + ([rel_path] if by_rel else []) + (["label"] if keep_labels else [])
        )

        def key(df: pd.DataFrame, rel: bool) -> pd.Series:
            frame = "#" + df["frame_index"].astype("string").fillna("")
            by_path = "path:" + df["path"].astype(str) + frame
            if not rel:
                return by_path
            return ("rel:" + df[rel_path].astype("string") + frame).fillna(by_path)  # a moved row's path is stale

        old_keys = key(old, by_rel)
        # by path too: an old row stored by its absolute path (outside the root then) that now lies under it
        new_keys = [key(new.rows, by_rel)] + ([key(new.rows, False)] if by_rel else [])
        known = pd.concat([k.isin(set(old_keys)) for k in new_keys], axis=1).any(axis=1)
        replaced_ids = np.zeros(0, dtype=np.int64)
        if replace and known.any():
            matched = {str(x) for k in new_keys for x in k[known]}
            replaced_ids = idx.live_ids[old_keys.isin(matched).to_numpy()]
            fresh = pd.Series(True, index=new.rows.index)
        else:
            fresh = ~known
        rows = new.rows.loc[fresh].reset_index(drop=True)
        vectors = new.vectors[fresh.to_numpy()]
        if keep_labels and len(replaced_ids):
            rows = _keep_old_labels(rows, [k.loc[fresh].reset_index(drop=True) for k in new_keys], old, old_keys)
        if len(rows) == 0:
            return idx.manifest, 0
        taken = set(old["id"]) - set(old.loc[np.isin(idx.live_ids, replaced_ids), "id"])
        clash = rows["id"].isin(taken)
        if clash.any():  # same relative id from another folder: qualify it with the absolute path
            suffix = rows.loc[clash, "id"].str.extract(r"(#\d+)$", expand=False).fillna("")
            rows.loc[clash, "id"] = rows.loc[clash, "path"].astype(str) + suffix
        m = idx.manifest
        m.generation += 1
        tag = _tag(m)
        if m.legacy:
            m = _upgrade(index_dir, idx, _tag(m))
        if len(replaced_ids):
            _remove_ids(idx, replaced_ids)
        first = m.next_id
        ids = np.arange(first, first + len(rows), dtype=np.int64)
        add_vectors(idx.index, vectors, ids, index_dir)  # on-disk lists: a new lists file, the old one untouched
        added = VectorSet(rows, vectors, m.fingerprint, m.encoder_spec)
        m.shards = m.shards + _write_shards(index_dir, added, first, tag)
        m.next_id = first + len(rows)
        m.count = m.count + len(rows) - len(replaced_ids)
        m.updated = _now()
        m.labels = _merged_labels(m.labels, rows, idx, replaced_ids)
        _commit(index_dir, m, idx.index, tag)
    return m, len(rows)


def _merged_labels(labels: dict[str, int], added: pd.DataFrame, idx: IndexDir, removed: np.ndarray) -> dict[str, int]:
    counts = pd.Series(labels, dtype="int64")
    counts = counts.add(pd.Series(_label_counts(added), dtype="int64"), fill_value=0)
    if len(removed):
        gone = idx.fetch(removed)
        counts = counts.sub(pd.Series(_label_counts(gone), dtype="int64"), fill_value=0)
    return {str(k): int(v) for k, v in counts.sort_index().items() if v > 0}


def _remove_ids(idx: IndexDir, row_ids: np.ndarray) -> None:
    """Take rows out of the live set: from FAISS where it can remove, always into the manifest's removed list."""
    m = idx.manifest
    if m.params.get("removal") != "tombstone":
        idx.index.remove_ids(faiss.IDSelectorBatch(np.asarray(row_ids, dtype=np.int64)))
    m.removed = sorted(set(m.removed) | {int(i) for i in row_ids})


def remove_from_index_dir(index_dir: str | Path, select: Callable[[IndexDir], np.ndarray]) -> tuple[IndexManifest, int]:
    """Remove the live rows that `select(idx)` marks (a boolean mask over positions). Returns (manifest, removed).

    Flat and IVF indexes drop the vectors from FAISS at once; HNSW (which cannot) and IVF lists on disk
    (which would be changed in place) skip them with an IDSelector until `compact`. Shards are not
    rewritten: the rows leave with the next compact.
    """
    index_dir = Path(index_dir)
    read_manifest(index_dir)
    with write_lock(index_dir):
        idx = open_index_dir(index_dir, use_gpu=False, writable=True)
        mask = np.asarray(select(idx), dtype=bool)
        ids = idx.live_ids[mask]
        if len(ids) == 0:
            raise RetrieveError(f"--index {index_dir}: nothing matches; nothing was removed")
        m = idx.manifest
        m.generation += 1
        tag = _tag(m)
        if m.legacy:
            m = _upgrade(index_dir, idx, _tag(m))
        labels = _merged_labels(m.labels, pd.DataFrame({"label": []}), idx, ids)
        _remove_ids(idx, ids)
        m.count -= len(ids)
        m.updated, m.labels = _now(), labels
        _commit(index_dir, m, idx.index, tag)
    return m, len(ids)


def compact_index_dir(index_dir: str | Path) -> tuple[IndexManifest, int]:
    """Rewrite the live rows into fresh shards (same ids) and rebuild FAISS without removed rows.

    Streamed (`_rewrite_live`): the store is never read whole, and the old FAISS index is
    only memory-mapped; the new index is what a streaming build of the live rows gives. Everything new is
    written under a new tag and committed by the manifest rename; a failure before that removes it again.
    """
    index_dir = Path(index_dir)
    read_manifest(index_dir)
    with write_lock(index_dir):
        idx = open_index_dir(index_dir, use_gpu=False)  # the old FAISS index is not changed, only replaced
        m = idx.manifest
        dropped = len(m.removed) if not m.legacy else 0
        ids = idx.live_ids
        m.generation += 1
        tag = _tag(m)
        cfg = IndexConfig(kind=m.kind, gpu=False, **_config_params(m.params))
        try:
            try:
                index, params, shards = _rewrite_live(idx, tag, cfg)
            except RetrieveError as exc:
                if len(ids):
                    raise
                raise RetrieveError(
                    f"{index_dir}: every row is removed and a {m.kind} index cannot be trained on none; "
                    "add rows first, or build the index again with --overwrite"
                ) from exc
            m.params = {**m.params, **params}
            m.shards = shards
            m.removed, m.updated, m.format = [], _now(), FORMAT
            m.next_id = max(m.next_id, int(ids[-1]) + 1 if len(ids) else 0)
            _commit(index_dir, m, index, tag)
        except BaseException:
            _drop_uncommitted(index_dir)
            raise
    return m, dropped


def _drop_uncommitted(index_dir: Path) -> None:
    """After a failed write: remove the files it left that the committed manifest does not name."""
    try:
        _collect_garbage(index_dir, _parse_manifest(index_dir / MANIFEST))
    except Exception as exc:  # the failure itself is what the caller reports; the next write cleans up
        log.debug("--index %s: leftovers of a failed write not removed (%s)", index_dir, exc)


def _sample_step(n: int, sample: int) -> int:
    """A training sample takes every step-th vector of each part: up to `sample` of n, drawn evenly."""
    return max(1, int(round(1 / min(1.0, sample / max(n, 1)))))


def _presize(index: Any, n: int) -> None:
    """Room for n vectors in a flat store (Flat, HNSW's vectors) before adding: FAISS grows it by resizing
    a std::vector, which copies the whole store at each doubling (up to twice the index at the peak)."""
    store = inner(index)
    if isinstance(store, faiss.IndexHNSW):
        store = faiss.downcast_index(store.storage)
    if isinstance(store, faiss.IndexFlatCodes) and store.ntotal == 0:
        store.codes.resize(n * store.code_size)  # capacity for n: the memory the index will hold anyway
        store.codes.resize(0)  # size 0 again; the capacity stays


def _rewrite_live(
    idx: IndexDir, tag: str, cfg: IndexConfig
) -> tuple[faiss.Index, dict[str, Any], list[dict[str, Any]]]:
    """`index compact` without reading the store whole: (new FAISS index, its parameters, the new shards).

    The live rows of `idx` (removed ids skipped), read a row group at a time through a file of their own, go
    into new shards `shard-TAG[-NNNN].parquet` with their ids, CHUNK_BYTES of vectors each (the part size of
    `build_from_vectors`); as `StreamingBuild.finish` does with its parts, FAISS (kind and parameters from
    `cfg`) is trained on a sample drawn evenly from every new shard (while they are written; then they are
    read back) and filled shard by shard (a kind without training: each shard as it is written), an on-disk
    IVF through part files merged into a new lists file. So the result is what a streaming build of the live
    rows gives, under the old ids. Peak memory: the FAISS index, about two chunks, the sample.
    Nothing is committed here: the caller holds the write lock, commits, and removes what a failure leaves.
    """
    folder, dim = idx.path, idx.manifest.dim
    n = len(idx.live_ids)
    chunk = max(1, CHUNK_BYTES // (4 * dim), -(-n // 9999))  # at most 9,999 shards (the names' 4 digits)
    shards: list[dict[str, Any]] = []

    def write_all() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Writes the new shards, yielding each one's (vectors, ids) once it is written."""

        def write(rows: pd.DataFrame, vecs: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            suffix = f"-{len(shards):04d}" if n > chunk else ""
            path = folder / f"shard-{tag}{suffix}.parquet"
            vs = VectorSet(rows, vecs, idx.manifest.fingerprint, idx.manifest.encoder_spec)
            shards.append({**write_shard(path, vs, ids), **_describe(path)})
            return vecs, ids

        buffered: list[tuple[pd.DataFrame, np.ndarray, np.ndarray]] = []
        have = 0
        for piece in _live_pieces(idx):
            buffered.append(piece)
            have += len(piece[2])
            while have >= chunk:
                one = len(buffered) == 1
                rows = buffered[0][0] if one else pd.concat([b[0] for b in buffered], ignore_index=True)
                vecs = buffered[0][1] if one else np.concatenate([b[1] for b in buffered])
                ids = buffered[0][2] if one else np.concatenate([b[2] for b in buffered])
                yield write(rows.iloc[:chunk].reset_index(drop=True), vecs[:chunk], ids[:chunk])
                have -= chunk
                rest = (rows.iloc[chunk:].reset_index(drop=True), vecs[chunk:].copy(), ids[chunk:].copy())
                buffered = [rest] if have else []
        if have:
            rows = pd.concat([b[0] for b in buffered], ignore_index=True)
            yield write(rows, np.concatenate([b[1] for b in buffered]), np.concatenate([b[2] for b in buffered]))

    def reread() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for sh in shards:
            path = folder / sh["name"]
            with pa.OSFile(str(path)) as f:
                table = pq.ParquetFile(f, pre_buffer=False).read(columns=[ROW_ID, VECTOR_COLUMN])
            yield vectors_from_table(table, path), table.column(ROW_ID).to_numpy()

    def train_sample() -> np.ndarray:  # as StreamingBuild._train_sample: every step-th vector of every shard
        step = _sample_step(n, TRAIN_SAMPLE)
        out = [vecs[::step].copy() for vecs, _ in write_all()]  # copies: not views keeping a shard alive
        return np.vstack(out) if out else np.zeros((0, dim), dtype=np.float32)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:  # the shards as they are written, or read back
        return reread() if shards else write_all()  # (after a training sample drawn while writing them)

    # all the work runs inside fill_index, which takes the new index out of faiss_index's tables of new
    # indexes first (also when it fails); a kind that needs no training gets each shard as it is written
    index, _, params = new_index(dim, n, idx.manifest.kind, cfg, use_gpu=False)
    _presize(index, n)
    fill_index(index, batches, sample=train_sample, folder=folder)
    return index, params, shards


def _live_pieces(idx: IndexDir) -> Iterator[tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """(rows, vectors, ids) of the live rows, one row group of one shard at a time, in id order."""
    removed = idx.removed
    for shard in idx.reader.shards:
        offset = 0  # a format 1 store has no row_id column: its ids are the row positions
        with pa.OSFile(str(shard.path)) as f:
            for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=ROW_GROUP):
                table = pa.Table.from_batches([batch])
                if ROW_ID in table.column_names:
                    ids = table.column(ROW_ID).to_numpy().astype(np.int64, copy=False)
                else:
                    ids = np.arange(offset, offset + len(table), dtype=np.int64)
                offset += len(table)
                if len(removed):  # both sorted: a binary search each
                    at = np.minimum(np.searchsorted(removed, ids), len(removed) - 1)
                    keep = removed[at] != ids
                    if not keep.all():
                        table, ids = table.filter(pa.array(keep)), ids[keep]
                if not len(ids):
                    continue
                vecs = vectors_from_table(table, shard.path)
                rows = table.drop_columns([c for c in (VECTOR_COLUMN, ROW_ID) if c in table.column_names]).to_pandas()
                if "frame_index" in rows.columns:
                    rows["frame_index"] = rows["frame_index"].astype("Int64")
                yield rows, vecs, ids


def _config_params(params: dict[str, Any]) -> dict[str, Any]:
    """The IndexConfig fields an index was built with, from its manifest parameters."""
    names = {"hnsw_m": "hnsw_m", "ef_search": "hnsw_ef_search", "nlist": "ivf_nlist", "nprobe": "ivf_nprobe"}
    out = {field: params[key] for key, field in names.items() if key in params}
    if "pq_m" in params:
        out["pq_m"] = params["pq_m"]
    if params.get("lists") == ON_DISK:
        out["on_disk"] = True
    return out
