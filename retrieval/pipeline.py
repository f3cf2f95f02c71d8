"""The one path for data, shared by the CLI and the UI:
images -> tensors -> vectors (VectorSet) -> Parquet -> index -> results."""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from indexer.config import IndexConfig
from indexer.index_dir import IndexDir, IndexManifest, check_compatible, read_manifest, set_data_root
from indexer.privacy import is_person_name_column
from indexer.search import Hit, check_k, filter_mask, search
from indexer.store import VectorSet
from indexer.streaming import StreamingBuild
from retrieval.cases import CaseHit, aggregate, case_column, case_keys, check_aggregation
from retrieval.config import EncoderSpec, PreprocessConfig
from retrieval.data.dataset import DatasetTable, Skipped, load_dataset
from retrieval.data.imageio import read_frames
from retrieval.data.preprocess import preprocess_frame, to_tensor
from retrieval.embed import embed_rows, pick_device
from retrieval.encoders.base import Encoder
from retrieval.encoders.cluster_head import (
    ClusterHeadWeights,
    has_cluster_head,
    load_cluster_head,
    with_cluster_columns,
)
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.labels import is_multilabel, join_labels
from retrieval.relocate import REL_PATH, resolve_data_root, resolve_paths, with_rel_paths
from retrieval.vote import Vote, knn_vote, no_label_vote

log = logging.getLogger(__name__)


@dataclass
class LoadedEncoder:
    spec: EncoderSpec
    encoder: Encoder
    preprocess: PreprocessConfig
    fingerprint: dict[str, Any]
    cluster_head: ClusterHeadWeights | None = None  # a clustering checkpoint's head: cluster columns at index time


def load_encoder(spec: EncoderSpec, preprocess_overrides: dict[str, Any] | None = None) -> LoadedEncoder:
    """Build the encoder; its own default preprocessing, with any given options on top."""
    enc = create_encoder(spec.name, spec.weights, spec.seed)
    overrides = {k: v for k, v in (preprocess_overrides or {}).items() if v is not None}
    pre = replace(enc.default_preprocess, **overrides)
    if enc.source.startswith("random init"):
        log.info(
            "encoder %s is randomly initialised (seed %s); for pretrained weights pass --weights FILE "
            "(a timm/torchvision state_dict), or use the default imagenet-effnet-lite0",
            spec.name,
            spec.seed,
        )
    return LoadedEncoder(spec, enc, pre, enc.fingerprint(pre, spec.name), _cluster_head(spec.name))


def encoder_for_index(
    fingerprint: dict[str, Any], spec_dict: dict[str, Any], where: str, requested: EncoderSpec | None = None
) -> LoadedEncoder:
    """Rebuild the encoder an index was made with, and prove it is the same (weights hash included)."""
    spec = requested or EncoderSpec(**spec_dict)
    pre = PreprocessConfig.from_dict(fingerprint["preprocess"])
    enc = create_encoder(spec.name, spec.weights, spec.seed)
    loaded = LoadedEncoder(spec, enc, pre, enc.fingerprint(pre, spec.name), _cluster_head(spec.name))
    check_compatible(fingerprint, loaded.fingerprint, where)
    return loaded


def _cluster_head(encoder_name: str) -> ClusterHeadWeights | None:
    return load_cluster_head(encoder_name) if has_cluster_head(encoder_name) else None


def annotate_rows(rows: pd.DataFrame, vectors: np.ndarray, loaded: LoadedEncoder) -> pd.DataFrame:
    """Columns derived at embedding time: each file's content hash and, for a clustering checkpoint, each
    image's cluster and its probability (so results, the browser and --where can use them)."""
    rows = with_content_hashes(rows)
    return rows if loaded.cluster_head is None else with_cluster_columns(rows, vectors, loaded.cluster_head)


def report_skipped(skipped: list[Skipped], limit: int = 20) -> None:
    for s in skipped[:limit]:
        log.warning("%s", s)
    if len(skipped) > limit:
        log.warning("... and %d more skipped files", len(skipped) - limit)


def embed_dataset(
    source: str | Path,
    loaded: LoadedEncoder,
    batch_size: int = 32,
    workers: int | None = None,
    use_gpu: bool = True,
    progress: bool = True,
    labels: str | Path | None = None,
) -> tuple[VectorSet, list[Skipped]]:
    """Dataset folder or manifest -> VectorSet, with the files that were skipped (and why).

    `labels`: a CSV whose labels replace the dataset's (joined by path, sop_uid or accession).
    """
    table = _load_with_labels(source, labels)
    emb = embed_rows(table.rows, loaded.encoder, loaded.preprocess, batch_size, workers, pick_device(use_gpu), progress)
    skipped = table.skipped + emb.skipped
    if len(emb.rows) == 0:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise RetrieveError(f"{source}: none of the {len(table.rows)} images could be read{first}")
    vs = VectorSet(annotate_rows(emb.rows, emb.vectors, loaded), emb.vectors, loaded.fingerprint, loaded.spec.to_dict())
    return vs, skipped


def _load_with_labels(source: str | Path, labels: str | Path | None) -> DatasetTable:
    table = load_dataset(source)
    if labels is not None:
        table.rows, _ = join_labels(table.rows, labels, table.root)
    return table


CONTENT_HASH = "content_sha256"  # of the image file's bytes: finds the very image, wherever it was copied


def file_digest(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (None when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def with_content_hashes(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with a content_sha256 column (one hash per file, shared by a clip's frames)."""
    digests = {p: file_digest(p) for p in rows["path"].astype(str).unique()}
    out = rows.copy()
    out[CONTENT_HASH] = rows["path"].astype(str).map(digests)
    return out


STREAM_CHUNK = 2048  # images embedded between two part shards: the most an interruption can cost


def build_index_streaming(
    source: str | Path,
    loaded: LoadedEncoder,
    index_dir: str | Path,
    cfg: IndexConfig,
    batch_size: int = 32,
    workers: int | None = None,
    use_gpu: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    chunk: int | None = None,
    labels: str | Path | None = None,
) -> tuple[IndexManifest, list[Skipped], int]:
    """Dataset -> index folder, chunk by chunk: each embedded chunk is a part shard on disk at once, so
    `resume` after an interruption embeds only what is missing. Returns (manifest, skipped, resumed rows).

    `labels`: a CSV whose labels replace the dataset's (joined by path, sop_uid or accession).
    """
    table = _load_with_labels(source, labels)
    skipped = list(table.skipped)
    fp, spec = loaded.fingerprint, loaded.spec.to_dict()
    chunk = chunk or STREAM_CHUNK
    rows = with_rel_paths(table.rows, table.root)  # what makes the index relocatable
    with StreamingBuild(index_dir, fp, spec, cfg, overwrite, Path(source), resume) as build:
        todo = build.pending(rows)
        device = pick_device(use_gpu)
        n_chunks = (len(todo) + chunk - 1) // chunk
        for j, start in enumerate(range(0, len(todo), chunk)):
            part = todo.iloc[start : start + chunk].reset_index(drop=True)
            desc = f"embedding {j + 1}/{n_chunks}" if n_chunks > 1 else "embedding"
            emb = embed_rows(part, loaded.encoder, loaded.preprocess, batch_size, workers, device, progress, desc)
            skipped += emb.skipped
            build.add(VectorSet(annotate_rows(emb.rows, emb.vectors, loaded), emb.vectors, fp, spec))
        if build.rows == 0:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise RetrieveError(f"{source}: none of the {len(table.rows)} images could be read{first}")
        build.finish()
        set_data_root(index_dir, table.root, lock=False)  # the build holds the lock
        manifest = read_manifest(index_dir)
    return manifest, skipped, build.resumed_rows


@torch.inference_mode()
def embed_frames(frames: list[np.ndarray], loaded: LoadedEncoder) -> np.ndarray:
    """Decoded uint8 grayscale frames -> L2-normalised vectors (the encoder's preprocessing applied)."""
    batch = torch.stack([to_tensor(preprocess_frame(f, loaded.preprocess)) for f in frames])
    first = next(iter([*loaded.encoder.parameters(), *loaded.encoder.buffers()]), None)
    device = first.device if first is not None else torch.device("cpu")  # a parameter-free encoder runs on the CPU
    return loaded.encoder(batch.to(device)).float().cpu().numpy()


def embed_query_image(path: str | Path, loaded: LoadedEncoder) -> tuple[list[str], np.ndarray]:
    """All frames of a query file -> (names, vectors); raises UnreadableImageError for a bad file."""
    frames = read_frames(path, loaded.preprocess.ct_window)
    names = [str(path)] if len(frames) == 1 else [f"{path}#{i}" for i in range(len(frames))]
    return names, embed_frames(frames, loaded)


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]
    rows: pd.DataFrame  # the index rows of the hits, in rank order
    vote: Vote
    matched: int | None = None  # indexed images the filters allowed (None: no filter)
    group_by: str | None = None  # study/series/patient: each hit is a case (its best image, the case's score)
    cases: list[CaseHit] | None = None  # with group_by: the cases, in rank order

    def to_dict(self) -> dict[str, Any]:
        results = []
        for rank, (hit, row) in enumerate(zip(self.hits, self.rows.to_dict("records")), start=1):
            core = {
                "rank": rank,
                "id": _jsonable(row["id"]),
                "path": _jsonable(row["path"]),
                "label": _jsonable(row.get("label")),
                "patient_id": _jsonable(row.get("patient_id")),
                "score": round(hit.score, 6),
            }
            if self.cases is not None:  # the case, and its best image's row below
                case = self.cases[rank - 1]
                core.update({"case": case.case, "images": case.images})
            extra = {
                str(k): _jsonable(v)
                for k, v in row.items()
                if k not in core and k != "vector" and not is_person_name_column(k)  # an older index may hold names
            }
            results.append({**core, **extra})  # the engine's own fields can never be overwritten
        out: dict[str, Any] = {"query": self.query, "results": results, "vote": self.vote.to_dict()}
        if self.group_by is not None:
            out["group_by"] = self.group_by
        if self.matched is not None:
            out["matched"] = self.matched
        return out


def _jsonable(v: Any) -> Any:
    """Any Parquet cell as JSON: dates as ISO text, bytes as hex, arrays as lists, NaN/NA as null."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (float, np.floating)) and not np.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, (pd.Timestamp, np.datetime64, datetime.datetime, datetime.date, datetime.time)):
        return pd.Timestamp(v).isoformat() if not isinstance(v, datetime.time) else v.isoformat()
    if isinstance(v, (pd.Timedelta, np.timedelta64, datetime.timedelta)):
        return pd.Timedelta(v).isoformat()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)  # Decimal, UUID, anything else: its text


def query_vectors(
    idx: IndexDir,
    names: list[str],
    vectors: np.ndarray,
    k: int,
    exclude_patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
    exclude_positions: Sequence[int] = (),
    *,
    group_by: str | None = None,
    agg: str = "max",
    data_root: str | Path | None = None,
) -> list[QueryResult]:
    """Search, then vote; `exclude_positions` leaves out given rows (an indexed case querying itself).

    `group_by` (study, series, patient) answers with k cases instead of k images; `data_root` is where
    the indexed files are now (default: where the index recorded them). Only the filter columns and the
    rows of the results are read from the shards.
    """
    allowed = _allowed(idx, exclude_patients, where)
    if len(exclude_positions):
        allowed = np.ones(idx.count, dtype=bool) if allowed is None else allowed
        allowed[list(exclude_positions)] = False
    root = resolve_data_root(idx, data_root)
    return _answer(idx, names, vectors, k, allowed, vote, None, group_by, agg, root)


def query_files(
    idx: IndexDir,
    loaded: LoadedEncoder,
    paths: list[str],
    k: int,
    exclude_patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
    include_self: bool = False,
    *,
    group_by: str | None = None,
    agg: str = "max",
    data_root: str | Path | None = None,
) -> tuple[list[QueryResult], list[str]]:
    """Query with image files; unreadable ones are reported, the others answered in one batched search.

    Unless `include_self`, a query file that is itself in the index (same bytes, or the same path in
    an index without content hashes) is left out of its own results and vote, and so are the rows
    that share a near_dup_group with it.
    """
    errors: list[str] = []
    allowed = _allowed(idx, exclude_patients, where)
    root = resolve_data_root(idx, data_root)
    identity = None if include_self else _identity_columns(idx, root)  # read once for every query file
    names: list[str] = []
    blocks: list[np.ndarray] = []
    own: list[np.ndarray] = []
    for p in paths:
        try:
            file_names, vecs = embed_query_image(p, loaded)
        except UnreadableImageError as exc:
            errors.append(str(exc))
            continue
        mask = None if identity is None else self_mask(identity, p)
        ids = idx.live_ids[mask] if mask is not None else np.zeros(0, dtype=np.int64)
        names += file_names
        blocks.append(vecs)
        own += [ids] * len(file_names)
    if not names:
        return [], errors
    vectors = np.vstack(blocks)
    return _answer(idx, names, vectors, k, allowed, vote, own, group_by, agg, root), errors


def _allowed(idx: IndexDir, exclude_patients: Sequence[str], where: Sequence[tuple[str, str]]) -> np.ndarray | None:
    """The candidate mask of the filters; a patient id the index does not hold is an error, not a no-op."""
    if exclude_patients:
        known = (
            set(idx.read_columns(["patient_id"])["patient_id"].dropna().astype(str))
            if ("patient_id" in idx.columns)
            else set()
        )
        unknown = [p for p in exclude_patients if p not in known]
        if unknown:
            raise RetrieveError(
                f"--exclude-patient {unknown[0]}: no image of this patient id in the index, so nothing to leave out"
            )
    return filter_mask(idx, list(exclude_patients), list(where))


def _identity_columns(idx: IndexDir, root: Path | None = None) -> pd.DataFrame:
    """The columns that tell an indexed image's identity (hash, path, near-duplicate group), live rows."""
    cols = [c for c in (CONTENT_HASH, "path", REL_PATH, "near_dup_group") if c in idx.columns]
    return resolve_paths(idx.read_columns(cols), root)


def self_mask(rows: pd.DataFrame, path: str | Path) -> np.ndarray | None:
    """Mask of the rows (from _identity_columns) that are the query file itself or its near-duplicates."""
    same = np.zeros(len(rows), dtype=bool)
    if CONTENT_HASH in rows:
        digest = file_digest(path)
        same |= (rows[CONTENT_HASH] == digest).to_numpy(dtype=bool) if digest else same
    resolved = str(Path(path).expanduser().resolve())
    same |= (rows["path"].astype(str) == resolved).to_numpy(dtype=bool)
    if "near_dup_group" in rows and same.any():
        groups = set(rows.loc[same, "near_dup_group"].dropna().astype(str)) - {""}
        same |= rows["near_dup_group"].astype("string").isin(groups).fillna(False).to_numpy(dtype=bool)
    return same if same.any() else None


def _search_excluding(
    idx: IndexDir, vectors: np.ndarray, depth: int, allowed: np.ndarray | None, own: list[np.ndarray]
) -> list[list[Hit]]:
    """`depth` allowed neighbours per query, none of its own rows: one FAISS batch, deep enough to drop them."""
    extra = max((len(o) for o in own), default=0)
    found = search(idx, vectors, min(depth + extra, idx.count), allowed)
    out = []
    for hits, mine in zip(found, own):
        drop = set(mine.tolist())
        out.append([h for h in hits if h.row_id not in drop][:depth])
    return out


def _answer(
    idx: IndexDir,
    names: list[str],
    vectors: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    vote: str,
    own: list[np.ndarray] | None = None,
    group_by: str | None = None,
    agg: str = "max",
    root: Path | None = None,
) -> list[QueryResult]:
    if allowed is not None and not allowed.any():
        raise RetrieveError("no indexed image is left after --exclude-patient/--where")
    check_k(k, idx.count)
    matched = None if allowed is None else int(allowed.sum())
    own = own if own is not None else [np.zeros(0, dtype=np.int64)] * len(names)
    labelled, multilabel = has_labels(idx), is_multilabel(idx.manifest.labels)
    if group_by is not None:
        return _answer_cases(
            idx, names, vectors, k, allowed, vote, own, group_by, agg, root, matched, labelled, multilabel
        )
    out = []
    for name, hits in zip(names, _search_excluding(idx, vectors, k, allowed, own)):
        rows = resolve_paths(idx.fetch([h.row_id for h in hits]), root)
        v = _vote(rows, [h.score for h in hits], vote, labelled, multilabel)
        out.append(QueryResult(name, hits, rows, v, matched))
    return out


def _vote(rows: pd.DataFrame, scores: list[float], vote: str, labelled: bool, multilabel: bool = False) -> Vote:
    if not labelled:
        return no_label_vote()
    labels = [None if pd.isna(x) else str(x) for x in rows["label"]] if "label" in rows else [None] * len(rows)
    return knn_vote(labels, scores, vote, multilabel, rows["id"].tolist() if "id" in rows else None)


def _answer_cases(
    idx: IndexDir,
    names: list[str],
    vectors: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    vote: str,
    own: list[np.ndarray],
    group_by: str,
    agg: str,
    root: Path | None,
    matched: int | None,
    labelled: bool,
    multilabel: bool,
) -> list[QueryResult]:
    """k cases per query: image neighbours searched ever deeper (x4) until k cases are among them."""
    case_column(group_by)
    check_aggregation(agg)
    limit = idx.count if allowed is None else int(allowed.sum())
    depth = min(limit, max(4 * k, k + 16))
    pending = list(range(len(names)))
    answers: dict[int, QueryResult] = {}
    while pending:
        found = _search_excluding(idx, vectors[pending], depth, allowed, [own[i] for i in pending])
        deeper = []
        for i, hits in zip(pending, found):
            rows = idx.fetch([h.row_id for h in hits])
            cases = aggregate(case_keys(rows, group_by), [h.score for h in hits], agg, k)
            if len(cases) < k and len(hits) == depth and depth < limit:
                deeper.append(i)
                continue
            best = [c.best for c in cases]
            case_hits = [Hit(hits[c.best].position, c.score, hits[c.best].row_id) for c in cases]
            best_rows = resolve_paths(rows.iloc[best].reset_index(drop=True), root)
            v = _vote(best_rows, [c.score for c in cases], vote, labelled, multilabel)
            answers[i] = QueryResult(names[i], case_hits, best_rows, v, matched, group_by, cases)
        pending, depth = deeper, min(limit, depth * 4)
    return [answers[i] for i in range(len(names))]


def has_labels(idx: IndexDir) -> bool:
    """Whether any indexed image has a label (from the manifest's label counts, nothing read)."""
    return any(k != "(unlabelled)" for k in idx.manifest.labels)
