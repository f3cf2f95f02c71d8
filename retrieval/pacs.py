"""Index a PACS: search a DICOMweb server, fetch the instances the index lacks, embed them, commit.

`sync_dicomweb` is a generator of progress events (the front end shows them); its last event holds
the result. `embed_dicomweb` does the same search, fetch and embedding (the same rows and vectors) into a
vectors file's VectorSet instead of an index (`retrieve embed --dicomweb`). The SOP instance UID is an
instance's identity: a sync fetches only the instances whose
`sop_uid` the index does not hold yet, so running it again fetches nothing new, and a sync with
`--since` is an incremental one. Fetched instances are written to a temporary folder and decoded by
the same reader as local DICOM files (multi-frame cine included: a row per frame).

Faults: by default the index is written once, after every fetched instance is embedded, so a server
that goes away mid-sync leaves the index exactly as it was and the next sync does the work again;
with `commit_every=N` the index is committed (atomically) every N instances, so an interrupted sync
keeps what it committed and the next one resumes after it. An instance that cannot be fetched or
decoded is skipped with a one-line reason and counted; a server that cannot be reached (after the
client's retries) stops the sync with a one-line error.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from indexer.config import IndexConfig
from indexer.index_dir import (
    IndexDir,
    IndexManifest,
    add_to_index_dir,
    build_index_dir,
    check_can_build,
    check_compatible,
    open_index_dir,
    read_manifest,
)
from indexer.store import VectorSet
from retrieval.data.dataset import CORE_COLUMNS, Skipped
from retrieval.data.dicom import NATIVE_SYNTAXES, read_dicom_header
from retrieval.data.dicomweb import (
    DEFAULT_VIEWER,
    EXPLICIT_LE,
    DicomWebSource,
    Filters,
    InstanceUnavailable,
    RemoteInstance,
    ServerUnreachable,
    instance_ref,
    relink,
    viewer_link,
)
from retrieval.embed import embed_rows, pick_device
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.pipeline import LoadedEncoder, QueryResult, with_content_hashes

log = logging.getLogger(__name__)

IDENTITY_COLUMNS = ["study_uid", "series_uid", "sop_uid", "modality", "body_part", "study_date", "accession"]
LINK_COLUMNS = ["source_url", "viewer_url"]


@dataclass
class SyncResult:
    found: int  # instances the search matched
    already: int  # of them already in the index (not fetched)
    fetched: int
    indexed: int  # instances embedded and committed
    rows: int  # index rows they gave (a row per frame)
    skipped: list[Skipped] = field(default_factory=list)
    manifest: IndexManifest | None = None  # None: nothing was written
    vectors: VectorSet | None = None  # embed_dicomweb: the vectors (same rows and columns a sync indexes)


@dataclass
class SyncProgress:
    stage: str  # "searched", "fetched", "indexed", "committed", "done"
    found: int = 0
    todo: int = 0
    fetched: int = 0
    indexed: int = 0
    committed: int = 0
    skipped: int = 0
    result: SyncResult | None = None


@dataclass(frozen=True)
class SyncOptions:
    fetch_batch: int = 32  # instances fetched, then embedded together
    fetch_workers: int = 4  # WADO-RS requests in flight at once
    commit_every: int | None = None  # None: one commit at the end; N: commit each N instances
    batch_size: int = 32  # encoder batch
    use_gpu: bool = True
    viewer_template: str | None = DEFAULT_VIEWER

    def __post_init__(self) -> None:
        if self.fetch_batch < 1 or self.fetch_workers < 1 or (self.commit_every is not None and self.commit_every < 1):
            raise RetrieveError("--commit-every and the fetch batch must be at least 1")


def indexed_sop_uids(index_dir: str | Path) -> set[str]:
    """The SOP instance UIDs an index holds (empty for an index of local files without that column)."""
    idx = open_index_dir(index_dir, use_gpu=False)
    if "sop_uid" not in idx.columns:
        return set()
    col = idx.read_columns(["sop_uid"])["sop_uid"]
    return {str(v) for v in col.dropna()}


def embed_remote(
    source: DicomWebSource, study: str, series: str, sop: str, loaded: LoadedEncoder
) -> tuple[list[str], np.ndarray]:
    """A query by reference: fetch one instance and embed all its frames -> (names, vectors).

    Names are the instance's `dicomweb://` reference (with `#frame` for a cine). The instance is
    decoded by the local reader; one stored in a syntax it cannot decode is fetched again transcoded.
    """
    from retrieval.pipeline import embed_query_image

    ref = instance_ref(study, series, sop)
    with tempfile.TemporaryDirectory(prefix="retrieve-dicomweb-") as tmp:
        path = Path(tmp) / "instance.dcm"
        path.write_bytes(source.fetch(study, series, sop))
        try:
            _, vectors = embed_query_image(path, loaded)
        except UnreadableImageError as exc:
            if _transfer_syntax(path) in NATIVE_SYNTAXES:
                raise UnreadableImageError(ref, exc.reason) from None
            path.write_bytes(source.fetch(study, series, sop, EXPLICIT_LE))
            try:
                _, vectors = embed_query_image(path, loaded)
            except UnreadableImageError as again:
                raise UnreadableImageError(ref, again.reason) from None
    names = [ref] if len(vectors) == 1 else [f"{ref}#{i}" for i in range(len(vectors))]
    return names, vectors


def relink_results(results: list[QueryResult], template: str) -> None:
    """Query-time viewer links: the rows of hits from a DICOMweb server get `viewer_url` from `template`.

    Rows of local files (no `source_url`) are left as they are; an index without the link columns is untouched.
    """
    for res in results:
        if "source_url" not in res.rows.columns or "study_uid" not in res.rows.columns:
            continue
        records = [{k: (None if _missing(v) else v) for k, v in r.items()} for r in res.rows.to_dict("records")]
        hits = relink(records, template)
        res.rows = res.rows.copy()
        res.rows["viewer_url"] = [h.get("viewer_url") for h in hits]


def _missing(v: object) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # arrays and other cells that are not one value
        return False


def positions_of_instance(idx: IndexDir, sop: str) -> list[int]:
    """Positions of an instance's rows in an opened index (to leave a case out of its own results)."""
    if "sop_uid" not in idx.columns:
        return []
    col = idx.read_columns(["sop_uid"])["sop_uid"].astype("string")
    return [int(i) for i in np.flatnonzero((col == sop).fillna(False).to_numpy(dtype=bool))]


def sync_dicomweb(
    source: DicomWebSource,
    filters: Filters,
    index_dir: str | Path,
    loaded: LoadedEncoder,
    create: bool = False,
    index_cfg: IndexConfig | None = None,
    overwrite: bool = False,
    opts: SyncOptions | None = None,
) -> Iterator[SyncProgress]:
    """Search, fetch what is new, embed and commit; yields progress, the last event with the result.

    `create` builds a new index (refused, before anything is fetched, where `index build` would
    refuse); otherwise the index must exist and its own encoder is `loaded`.
    """
    opts = opts or SyncOptions()
    index_dir = Path(index_dir)
    if create:
        check_can_build(index_dir, overwrite)
        known: set[str] = set()
    else:
        check_compatible(read_manifest(index_dir).fingerprint, loaded.fingerprint, f"--index {index_dir}")
        known = indexed_sop_uids(index_dir)
    source.check()
    # one instance listed twice (under two --study filters, say) counts and is fetched once
    found = list({r.sop_uid: r for r in source.search(filters)}.values())
    todo = [r for r in found if r.sop_uid not in known]
    state = SyncProgress("searched", found=len(found), todo=len(todo))
    log.info(
        "%s: %d instance(s) match, %d already indexed, %d to fetch",
        source.cfg.url,
        len(found),
        len(found) - len(todo),
        len(todo),
    )
    yield state
    skipped: list[Skipped] = []
    pending: list[VectorSet] = []
    pending_instances = 0
    manifest: IndexManifest | None = None
    rows_committed = 0
    device = pick_device(opts.use_gpu)
    for start in range(0, len(todo), opts.fetch_batch):
        batch = todo[start : start + opts.fetch_batch]
        try:
            vs = yield from _fetch_and_embed(source, batch, loaded, opts, device, state, skipped)
        except ServerUnreachable as exc:
            raise ServerUnreachable(_stopped(str(exc), state.committed, create, manifest)) from None
        if vs is not None:
            pending.append(vs)
            n_new = vs.rows["sop_uid"].nunique()
            pending_instances += n_new
            state.indexed += n_new
        state.skipped = len(skipped)
        yield _event(state, "indexed")
        if opts.commit_every is not None and pending_instances >= opts.commit_every:
            manifest, rows = _commit(index_dir, pending, create and manifest is None, index_cfg, overwrite)
            rows_committed += rows
            state.committed += pending_instances
            pending, pending_instances = [], 0
            yield _event(state, "committed")
    if pending:
        manifest, rows = _commit(index_dir, pending, create and manifest is None, index_cfg, overwrite)
        rows_committed += rows
        state.committed += pending_instances
        yield _event(state, "committed")
    if create and manifest is None:
        first = f"; first: {skipped[0]}" if skipped else ""
        what = f"none of the {len(todo)} instance(s) could be indexed" if todo else "no instance matches the filters"
        raise RetrieveError(f"--dicomweb {source.cfg.url}: {what}{first}")
    result = SyncResult(len(found), len(found) - len(todo), state.fetched, state.committed, rows_committed, skipped)
    result.manifest = manifest
    done = _event(state, "done")
    done.result = result
    yield done


def embed_dicomweb(
    source: DicomWebSource, filters: Filters, loaded: LoadedEncoder, opts: SyncOptions | None = None
) -> Iterator[SyncProgress]:
    """Search, fetch and embed every matching instance, writing no index; yields progress, the last event
    with the result, whose `vectors` are the rows and vectors a sync of the same instances would index."""
    opts = opts or SyncOptions()
    source.check()
    todo = list({r.sop_uid: r for r in source.search(filters)}.values())
    state = SyncProgress("searched", found=len(todo), todo=len(todo))
    log.info("%s: %d instance(s) match", source.cfg.url, len(todo))
    yield state
    skipped: list[Skipped] = []
    parts: list[VectorSet | None] = []
    device = pick_device(opts.use_gpu)
    for start in range(0, len(todo), opts.fetch_batch):
        try:
            vs = yield from _fetch_and_embed(
                source, todo[start : start + opts.fetch_batch], loaded, opts, device, state, skipped
            )
        except ServerUnreachable as exc:
            raise ServerUnreachable(f"{exc}; nothing was written") from None
        parts.append(vs)
        if vs is not None:
            state.indexed += vs.rows["sop_uid"].nunique()
        state.skipped = len(skipped)
        yield _event(state, "indexed")
    merged: VectorSet | None = None
    for vs in parts:
        merged = _merge(merged, vs)
    if merged is None:
        first = f"; first: {skipped[0]}" if skipped else ""
        what = f"none of the {len(todo)} instance(s) could be embedded" if todo else "no instance matches the filters"
        raise RetrieveError(f"--dicomweb {source.cfg.url}: {what}{first}")
    result = SyncResult(len(todo), 0, state.fetched, state.indexed, len(merged), skipped, vectors=merged)
    done = _event(state, "done")
    done.result = result
    yield done


def _fetch_and_embed(
    source: DicomWebSource,
    batch: list[RemoteInstance],
    loaded: LoadedEncoder,
    opts: SyncOptions,
    device: torch.device,
    state: SyncProgress,
    skipped: list[Skipped],
) -> Generator[SyncProgress, None, VectorSet | None]:
    """Fetch a batch of instances (requests overlap) and embed them; yields "fetched" events, returns the vectors.

    Instances that cannot be fetched or decoded are appended to `skipped`; a server that cannot be reached
    raises ServerUnreachable (the caller says what that leaves).
    """
    with tempfile.TemporaryDirectory(prefix="retrieve-dicomweb-") as tmp:
        files: dict[str, tuple[Path, RemoteInstance]] = {}
        with ThreadPoolExecutor(max_workers=opts.fetch_workers) as pool:  # requests overlap, results in order
            futures = [
                pool.submit(_fetch_to, source, inst, Path(tmp) / f"{k:06d}.dcm", "*") for k, inst in enumerate(batch)
            ]
            try:
                for inst, future in zip(batch, futures):
                    try:
                        path = future.result()
                        files[str(path)] = (path, inst)
                    except InstanceUnavailable as exc:
                        skipped.append(Skipped(inst.ref, f"cannot be fetched ({exc})"))
                    state.fetched += 1
                    state.skipped = len(skipped)
                    yield _event(state, "fetched")
            finally:
                for future in futures:
                    future.cancel()
        vs, bad = _embed_fetched(files, loaded, opts, source.cfg.url, device)
        # stored compressed in a syntax this reader cannot decode: ask the server to transcode it, once
        again = _compressed_failures(files, bad, vs)
        if again:
            bad = [b for b in bad if b.path not in again]
            refetched: dict[str, tuple[Path, RemoteInstance]] = {}
            for inst in again.values():
                try:
                    path = _fetch_to(source, inst, Path(tmp) / f"le-{len(refetched):06d}.dcm", EXPLICIT_LE)
                    refetched[str(path)] = (path, inst)
                except InstanceUnavailable as exc:
                    bad.append(Skipped(inst.ref, f"cannot be fetched uncompressed ({exc})"))
            vs2, bad2 = _embed_fetched(refetched, loaded, opts, source.cfg.url, device)
            vs, bad = _merge(vs, vs2), bad + bad2
        skipped += bad
    return vs


def _fetch_to(source: DicomWebSource, inst: RemoteInstance, path: Path, transfer_syntax: str) -> Path:
    path.write_bytes(source.fetch(inst.study_uid, inst.series_uid, inst.sop_uid, transfer_syntax))
    return path


def _transfer_syntax(path: Path) -> str | None:
    import pydicom

    try:  # the file meta group only: a deflated data set is never inflated here
        return str(pydicom.filereader.read_file_meta_info(str(path)).TransferSyntaxUID)
    except Exception:  # unreadable headers are reported by the reader itself
        return None


def _compressed_failures(
    files: dict[str, tuple[Path, RemoteInstance]], bad: list[Skipped], vs: VectorSet | None
) -> dict[str, RemoteInstance]:
    """Instances (by reference) that gave no row at all and are stored in a compressed transfer syntax."""
    done = set() if vs is None else set(vs.rows["sop_uid"])
    by_ref = {inst.ref: (path, inst) for path, inst in files.values()}
    out = {}
    for b in bad:
        if b.path in by_ref and b.path not in out:
            path, inst = by_ref[b.path]
            syntax = _transfer_syntax(path)
            if inst.sop_uid not in done and syntax is not None and syntax not in NATIVE_SYNTAXES:
                out[b.path] = inst
    return out


def _merge(a: VectorSet | None, b: VectorSet | None) -> VectorSet | None:
    if a is None or b is None:
        return a if b is None else b
    rows = pd.concat([a.rows, b.rows], ignore_index=True)
    return VectorSet(rows, np.vstack([a.vectors, b.vectors]), a.fingerprint, a.encoder_spec)


def _event(state: SyncProgress, stage: str) -> SyncProgress:
    return SyncProgress(
        stage, state.found, state.todo, state.fetched, state.indexed, state.committed, state.skipped, state.result
    )


def _stopped(reason: str, committed: int, create: bool, manifest: IndexManifest | None) -> str:
    if committed:
        return f"{reason}; {committed} instance(s) were committed before it stopped: sync again to resume"
    if create and manifest is None:
        return f"{reason}; nothing was written"
    return f"{reason}; the index is as it was before this sync"


def _embed_fetched(
    files: dict[str, tuple[Path, RemoteInstance]],
    loaded: LoadedEncoder,
    opts: SyncOptions,
    url: str,
    device: torch.device,
) -> tuple[VectorSet | None, list[Skipped]]:
    """Fetched instances (temporary files) -> rows (a row per frame) -> vectors, through the local reader."""
    skipped: list[Skipped] = []
    records = []
    for key, (path, inst) in files.items():
        try:
            n = read_dicom_header(path).n_frames
        except UnreadableImageError as exc:
            skipped.append(Skipped(inst.ref, exc.reason))
            continue
        meta = {
            "label": None,
            **inst.columns(),
            "source_url": url,
            "viewer_url": viewer_link(opts.viewer_template, url, inst.study_uid, inst.series_uid, inst.sop_uid),
        }
        for f in [None] if n == 1 else range(n):
            rid = inst.sop_uid if f is None else f"{inst.sop_uid}#{f}"
            records.append({"id": rid, "path": key, "frame_index": f, **meta})
    if not records:
        return None, skipped
    columns = CORE_COLUMNS + IDENTITY_COLUMNS + LINK_COLUMNS
    rows = pd.DataFrame.from_records(records)[columns]
    rows["frame_index"] = rows["frame_index"].astype("Int64")
    emb = embed_rows(rows, loaded.encoder, loaded.preprocess, opts.batch_size, 0, device, progress=False)
    refs = {key: inst.ref for key, (_, inst) in files.items()}
    per_instance: dict[str, list[str]] = {}  # a cine's frames fail together: one line per instance
    for s in emb.skipped:
        per_instance.setdefault(refs.get(s.path, s.path), []).append(s.reason)
    for ref, reasons in per_instance.items():
        more = f" ({len(reasons)} frames)" if len(reasons) > 1 else ""
        skipped.append(Skipped(ref, reasons[0] + more))
    if len(emb.rows) == 0:
        return None, skipped
    kept = with_content_hashes(emb.rows)  # of the fetched bytes, while the files are still there
    kept["path"] = kept["path"].map(refs)
    vs = VectorSet(kept, np.asarray(emb.vectors, dtype=np.float32), loaded.fingerprint, loaded.spec.to_dict())
    return vs, skipped


def _commit(
    index_dir: Path, pending: list[VectorSet], create: bool, cfg: IndexConfig | None, overwrite: bool
) -> tuple[IndexManifest, int]:
    """One atomic write of the pending vectors: a new index (first commit of a build) or an append."""
    rows = pd.concat([p.rows for p in pending], ignore_index=True)
    vectors = np.vstack([p.vectors for p in pending])
    vs = VectorSet(rows, vectors, pending[0].fingerprint, pending[0].encoder_spec)
    if create:
        manifest = build_index_dir(index_dir, vs, cfg or IndexConfig(), overwrite=overwrite)
        return manifest, len(vs)
    manifest, added = add_to_index_dir(index_dir, vs)
    return manifest, added
