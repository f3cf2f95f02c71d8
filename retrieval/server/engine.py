"""What the server serves, shared by every request: the encoder (loaded once at start) and the index
version with its id -> row map and the data root that bounds every file the server reads.

The index version is a `Snapshot`, swapped whole when a writer (`retrieve index add`, `remove`, `compact`,
`relocate`, a rebuild) commits a new manifest: each request stats the manifest file once and, when it
changed, reopens the index the way any reader does (no lock: a writer's commit is one rename, and
`open_index_dir` rereads a version switched under it) before answering. A request works on the one
snapshot it took at its start, so it sees the old version or the new one, never a mix; a removed row is
not served by any request that starts after its removal is committed. A new version that cannot be
opened (damaged, another encoder) is logged once and the old one stays served until a restart."""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from indexer.index_dir import MANIFEST, IndexDir, open_index_dir, read_manifest
from indexer.search import check_k, parse_where
from retrieval.cases import case_column, check_aggregation
from retrieval.data.dicomweb import DicomWebSource, ThumbnailCache, instance_ref, parse_ref, server_config
from retrieval.data.imageio import read_frame
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.pipeline import LoadedEncoder, QueryResult, encoder_for_index, query_files, query_vectors
from retrieval.relocate import resolve_data_root, resolve_paths
from retrieval.results import item_json, query_payload
from retrieval.server.config import PacsSettings
from retrieval.server.uploads import UploadError, unreadable
from retrieval.vote import VOTE_WEIGHTINGS

log = logging.getLogger(__name__)


class NotFound(RetrieveError):
    """An item id the index does not hold."""


class Forbidden(RetrieveError):
    """A file outside the data root."""


class NoPacs(RetrieveError):
    """A query by reference to an instance the index does not hold, and the index knows no PACS to ask."""


Stamp = tuple[int, int, int, int]  # the manifest file's device, inode, size and mtime (ns)


MISSING: Stamp = (0, 0, -1, 0)


def manifest_stamp(index: Path) -> Stamp:
    """What changes whenever a writer commits (a new manifest file replaces the old one); MISSING if none."""
    try:
        st = os.stat(index / MANIFEST)
    except OSError:
        return MISSING
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Snapshot:
    """One index version as served: a request takes one and uses only it."""

    idx: IndexDir
    ids: dict[str, int]  # item id -> row id
    data_root: Path  # where the indexed files are now (resolved); nothing outside it is ever read
    stamp: Stamp  # the manifest file when this version was opened (taken before reading it)

    @property
    def generation(self) -> int:
        return self.idx.manifest.generation


@dataclass
class Engine:
    index: Path
    snapshot: Snapshot  # the version served now; replaced whole (one assignment) by `current`
    loaded: LoadedEncoder
    lock: threading.Lock  # one query at a time through the encoder and the shard readers
    data_root_option: Path | None = None  # the operator's --data-root, passed on as `retrieve query` does
    pacs: PacsSettings = field(default_factory=PacsSettings)
    use_gpu: bool = False
    _sources: dict[str, DicomWebSource] = field(default_factory=dict, repr=False)
    _thumbs: dict[int, ThumbnailCache] = field(default_factory=dict, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    _thumb_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _failed: Stamp | None = field(default=None, repr=False)  # a manifest whose version could not be opened

    # the version served now, as it was last seen (no check of the disk): for tests and callers outside requests
    @property
    def idx(self) -> IndexDir:
        return self.snapshot.idx

    @property
    def ids(self) -> dict[str, int]:
        return self.snapshot.ids

    @property
    def data_root(self) -> Path:
        return self.snapshot.data_root

    @property
    def count(self) -> int:
        return self.snapshot.idx.count

    @property
    def stale(self) -> bool:
        """The index on disk changed and its new version could not be opened: an old one is served."""
        return self._failed is not None and self._failed == manifest_stamp(self.index)

    def health(self) -> dict[str, Any]:
        """The generation served (the manifest's counter, one more at every add, remove or compact), and
        `stale` when the index changed on disk but its new version could not be opened."""
        snap = self.current()
        return {"status": "ok", "generation": snap.generation, **({"stale": True} if self.stale else {})}

    def current(self) -> Snapshot:
        """The version to answer from: the one served, or the index's new version when a writer committed
        one since (opened here; other requests that see the change wait for it rather than answer from the
        old). One stat of the manifest when nothing changed."""
        snap = self.snapshot
        stamp = manifest_stamp(self.index)
        if stamp == snap.stamp or stamp == self._failed:
            return snap
        with self._reload_lock:
            snap = self.snapshot
            if stamp == snap.stamp or stamp == self._failed:
                return snap
            try:
                if stamp == MISSING:
                    raise RetrieveError(f"{MANIFEST} is missing")
                new = self._reopen(snap, stamp)
            except Exception as exc:  # any failure keeps the old version served
                self._failed = stamp
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.error(
                    "--index %s changed on disk but its new version cannot be opened (%s); still serving "
                    "generation %d (%d images): fix the index or restart the server",
                    self.index,
                    reason,
                    snap.generation,
                    snap.idx.count,
                )
                return snap
            self._failed = None
            if new.generation != snap.generation or new.idx.count != snap.idx.count:
                log.info(
                    "--index %s: now serving generation %d (%d images; was generation %d, %d images)",
                    self.index,
                    new.generation,
                    new.idx.count,
                    snap.generation,
                    snap.idx.count,
                )
            self.snapshot = new
            return new

    def _reopen(self, snap: Snapshot, stamp: Stamp) -> Snapshot:
        if read_manifest(self.index) == snap.idx.manifest:  # rewritten unchanged: keep the opened version
            return replace(snap, stamp=stamp)
        idx = open_index_dir(self.index, use_gpu=self.use_gpu)
        old = snap.idx.manifest
        if idx.manifest.fingerprint != old.fingerprint or idx.manifest.dim != old.dim:
            raise RetrieveError("rebuilt with another encoder; restart the server to serve it")
        return open_snapshot(idx, self.data_root_option, stamp)

    def query(
        self,
        upload: Path,
        name: str,
        k: int,
        exclude_patients: Sequence[str] = (),
        where: Sequence[str] = (),
        vote: str = "majority",
        include_self: bool = False,
        group_by: str | None = None,
        agg: str = "max",
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The same call and the same JSON as `retrieve query --json` for this one file."""
        snap = self.current()
        self._check(snap, k, vote, group_by, agg)
        conditions = parse_where(list(where))
        with self.lock:
            results, errors = query_files(
                snap.idx,
                self.loaded,
                [str(upload)],
                k,
                list(exclude_patients),
                conditions,
                vote,
                include_self,
                group_by=group_by,
                agg=agg,
                data_root=self.data_root_option,
            )
            device = snap.idx.search_device
        if errors:
            raise unreadable(errors[0], upload, name)
        named = [replace(r, query=r.query.replace(str(upload), name, 1)) for r in results]
        return query_payload(self._relinked(named), 1, device)

    def query_reference(
        self,
        study: str,
        series: str,
        sop: str,
        k: int,
        exclude_patients: Sequence[str] = (),
        where: Sequence[str] = (),
        vote: str = "majority",
        include_self: bool = False,
        group_by: str | None = None,
        agg: str = "max",
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """A query by reference: an indexed instance by its stored vectors (itself left out), any other
        fetched from the index's PACS and embedded. The same JSON as `query`."""
        from retrieval.pacs import embed_remote, positions_of_instance

        ref = instance_ref(study, series, sop)
        if parse_ref(ref) is None:
            raise RetrieveError("study, series and instance must be DICOM UIDs (digits and dots)")
        snap = self.current()
        idx = snap.idx
        self._check(snap, k, vote, group_by, agg)
        conditions = parse_where(list(where))
        with self.lock:
            own = positions_of_instance(idx, sop)
            if own:
                own = _in_frame_order(idx, own)
                names = [ref] if len(own) == 1 else [f"{ref}#{i}" for i in range(len(own))]
                stored = idx.reader.fetch(idx.live_ids[own].tolist(), vectors=True)[1]  # its rows only
                assert stored is not None
                vectors = stored
            else:
                names, vectors = embed_remote(self._source(_pacs_url(idx)), study, series, sop, self.loaded)
            excluded = [] if include_self else _with_near_duplicates(idx, own)
            results = query_vectors(
                idx,
                names,
                vectors,
                k,
                list(exclude_patients),
                conditions,
                vote,
                excluded,
                group_by=group_by,
                agg=agg,
                data_root=self.data_root_option,
            )
            device = idx.search_device
        return query_payload(self._relinked(results), 1, device)

    def _relinked(self, results: list[QueryResult]) -> list[QueryResult]:
        if self.pacs.viewer_template is not None:
            from retrieval.pacs import relink_results

            relink_results(results, self.pacs.viewer_template)
        return results

    def _check(self, snap: Snapshot, k: int, vote: str, group_by: str | None, agg: str) -> None:
        if vote not in VOTE_WEIGHTINGS:
            raise RetrieveError(f"vote {vote}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
        if group_by is not None:
            case_column(group_by)
        check_aggregation(agg)
        check_k(k, snap.idx.count)  # its "--k" reads "k" in the answer (app.http_terms)

    def _source(self, url: str) -> DicomWebSource:
        source = self._sources.get(url)
        if source is None:
            cfg = server_config(url, timeout=self.pacs.timeout, retries=self.pacs.retries)
            source = self._sources[url] = DicomWebSource(cfg)
        return source

    def _thumbnail_cache(self, size: int) -> ThumbnailCache:
        cache = self._thumbs.get(size)
        if cache is None:  # one folder and one byte limit for every size (each evicts over the whole folder)
            folder = self.pacs.thumbnail_cache
            if folder is None:
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="retrieve-thumbnails-")
                folder = Path(self._tmp.name)
            cache = self._thumbs[size] = ThumbnailCache(folder, self.pacs.thumbnail_cache_bytes, size)
        return cache

    def remote_thumbnail(self, row: dict[str, Any], max_side: int) -> bytes:
        """A `dicomweb://` row's PNG: rendered by its PACS (or fetched and decoded), cached with a size limit."""
        url = row.get("source_url")
        if url is None or pd.isna(url) or not str(url):
            raise NoPacs(f"item {row['id']}: its image is on a PACS the index does not record (no source_url)")
        frame = row.get("frame_index")
        f = None if frame is None or pd.isna(frame) else int(frame)
        with self._thumb_lock:  # one writer of the cache folder at a time (queries go on meanwhile)
            path = self._thumbnail_cache(max_side).get(self._source(str(url)), str(row["path"]), f)
            return path.read_bytes()

    def row(self, item_id: str, snap: Snapshot | None = None) -> dict[str, Any]:
        """The item's row, its path where the file is now (under the data root, for a relocatable index)."""
        snap = snap or self.current()
        row_id = snap.ids.get(item_id)
        if row_id is None:
            raise NotFound(f"no item {_shown(item_id)} in the index")
        with self.lock:
            rows = snap.idx.fetch([row_id])
        return resolve_paths(rows, snap.data_root).to_dict("records")[0]

    def item(self, item_id: str) -> dict[str, Any]:
        return item_json(self.row(item_id))

    def locate(self, stored: str, root: Path | None = None) -> Path:
        """An indexed path as a file under the data root; Forbidden for anything that would leave it."""
        root = root or self.data_root
        target = root / stored  # an absolute path stays as it is; the resolved file is checked
        try:
            real = target.resolve(strict=True)  # symlinks followed: where the bytes really are
        except (OSError, RuntimeError):
            raise NotFound("the item's file is missing under the data root") from None
        if not real.is_relative_to(root):
            raise Forbidden("the item's file lies outside the data root")
        if not real.is_file():
            what = "a folder" if real.is_dir() else "not a regular file"
            raise NotFound(f"the item's path under the data root is {what}, not an image file")
        return real

    def thumbnail(self, item_id: str, max_side: int) -> bytes:
        """The item's frame as a PNG whose longest side is at most max_side."""
        snap = self.current()
        row = self.row(item_id, snap)
        if parse_ref(str(row["path"])) is not None:
            return self.remote_thumbnail(row, max_side)
        path = self.locate(str(row["path"]), snap.data_root)
        frame = row.get("frame_index")
        f = -1 if frame is None or pd.isna(frame) else int(frame)
        try:
            img = Image.fromarray(read_frame(path, f, self.loaded.preprocess.ct_window))
        except UnreadableImageError as exc:
            raise UploadError(422, f"item {item_id}: {exc.reason}") from None
        img.thumbnail((max_side, max_side))
        out = io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()


def _shown(item_id: str, most: int = 200) -> str:
    """A client's item id for a message: quoted, and cut short when long."""
    if len(item_id) <= most:
        return repr(item_id)
    return f"{item_id[:most]!r}... ({len(item_id)} characters)"


def _in_frame_order(idx: IndexDir, positions: list[int]) -> list[int]:
    if len(positions) == 1 or "frame_index" not in idx.columns:
        return positions
    frames = idx.read_columns(["frame_index"])["frame_index"].to_numpy()
    return sorted(positions, key=lambda p: (pd.isna(frames[p]), frames[p] if not pd.isna(frames[p]) else 0))


def _with_near_duplicates(idx: IndexDir, positions: list[int]) -> list[int]:
    """The instance's rows and the rows sharing a near_dup_group with them (as a query file leaves out)."""
    if not positions or "near_dup_group" not in idx.columns:
        return positions
    groups = idx.read_columns(["near_dup_group"])["near_dup_group"].astype("string")
    mine = set(groups.iloc[positions].dropna()) - {""}
    if not mine:
        return positions
    more = np.flatnonzero(groups.isin(mine).fillna(False).to_numpy(dtype=bool))
    return sorted(set(positions) | {int(p) for p in more})


def _pacs_url(idx: IndexDir) -> str:
    """The PACS the index was synced from (its rows' source_url); NoPacs when it records none."""
    if "source_url" not in idx.columns:
        raise NoPacs("this index was not built from a PACS (no source_url): query by reference needs one")
    urls = sorted(set(idx.read_columns(["source_url"])["source_url"].dropna().astype(str)) - {""})
    if not urls:
        raise NoPacs("this index records no PACS (source_url): query by reference needs one")
    if len(urls) > 1:
        log.info("the index records %d PACS; asking the first, %s", len(urls), urls[0])
    return urls[0]


def _common_folder(idx: IndexDir, paths: pd.Series) -> Path:
    """An index that records no data root (built before relocatable indexes): its files' common folder."""
    absolute = [str(Path(p).parent) for p in paths.astype(str).unique() if os.path.isabs(p)]
    return Path(os.path.commonpath(absolute)) if absolute else idx.path.parent


def open_snapshot(idx: IndexDir, data_root: Path | None, stamp: Stamp) -> Snapshot:
    """An opened index version with its id map and its data root (`data_root`: the operator's --data-root)."""
    table = idx.read_columns(["id", "path"])
    ids = dict(zip(table["id"].astype(str), (int(i) for i in idx.live_ids)))
    recorded = resolve_data_root(idx, data_root)  # a given --data-root must hold the files (one-line error)
    root = (recorded or _common_folder(idx, table["path"])).resolve()
    if root == Path(root.anchor):
        raise RetrieveError(
            f"--index {idx.path}: the indexed files share no folder below {root}; rebuild the index from the "
            "folder that holds them (the server reads no file outside its data root)"
        )
    return Snapshot(idx, ids, root, stamp)


def load_engine(
    index: Path, data_root: Path | None = None, use_gpu: bool = True, pacs: PacsSettings | None = None
) -> Engine:
    """Load the encoder (checked against the index's fingerprint), once, and the index's current version."""
    stamp = manifest_stamp(index)  # before reading: a commit after this is seen by the first request
    manifest = read_manifest(index)
    loaded = encoder_for_index(manifest.fingerprint, manifest.encoder_spec, f"--index {index}")
    snap = open_snapshot(open_index_dir(index, use_gpu=use_gpu), data_root, stamp)
    engine = Engine(index, snap, loaded, threading.Lock(), data_root, pacs or PacsSettings(), use_gpu)
    log.info(
        "serving %d images of %s (generation %d); files read only under %s",
        snap.idx.count,
        index,
        snap.generation,
        snap.data_root,
    )
    return engine
