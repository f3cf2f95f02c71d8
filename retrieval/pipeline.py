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
from indexer.index_dir import IndexDir, IndexManifest, check_compatible
from indexer.search import Hit, filter_mask, search
from indexer.store import VectorSet
from indexer.streaming import StreamingBuild
from retrieval.config import EncoderSpec, PreprocessConfig
from retrieval.data.dataset import DatasetTable, Skipped, load_dataset
from retrieval.data.imageio import read_frames
from retrieval.data.preprocess import preprocess_frame, to_tensor
from retrieval.embed import embed_rows, pick_device
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.labels import join_labels
from retrieval.vote import Vote, knn_vote, no_label_vote

log = logging.getLogger(__name__)


@dataclass
class LoadedEncoder:
    spec: EncoderSpec
    encoder: Encoder
    preprocess: PreprocessConfig
    fingerprint: dict[str, Any]


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
    return LoadedEncoder(spec, enc, pre, enc.fingerprint(pre, spec.name))


def encoder_for_index(
    fingerprint: dict[str, Any], spec_dict: dict[str, Any], where: str, requested: EncoderSpec | None = None
) -> LoadedEncoder:
    """Rebuild the encoder an index was made with, and prove it is the same (weights hash included)."""
    spec = requested or EncoderSpec(**spec_dict)
    pre = PreprocessConfig.from_dict(fingerprint["preprocess"])
    enc = create_encoder(spec.name, spec.weights, spec.seed)
    loaded = LoadedEncoder(spec, enc, pre, enc.fingerprint(pre, spec.name))
    check_compatible(fingerprint, loaded.fingerprint, where)
    return loaded


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
    vs = VectorSet(with_content_hashes(emb.rows), emb.vectors, loaded.fingerprint, loaded.spec.to_dict())
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
    with StreamingBuild(index_dir, fp, spec, cfg, overwrite, Path(source), resume) as build:
        todo = build.pending(table.rows)
        device = pick_device(use_gpu)
        n_chunks = (len(todo) + chunk - 1) // chunk
        for j, start in enumerate(range(0, len(todo), chunk)):
            part = todo.iloc[start : start + chunk].reset_index(drop=True)
            desc = f"embedding {j + 1}/{n_chunks}" if n_chunks > 1 else "embedding"
            emb = embed_rows(part, loaded.encoder, loaded.preprocess, batch_size, workers, device, progress, desc)
            skipped += emb.skipped
            build.add(VectorSet(with_content_hashes(emb.rows), emb.vectors, fp, spec))
        if build.rows == 0:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise RetrieveError(f"{source}: none of the {len(table.rows)} images could be read{first}")
        manifest = build.finish()
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
            extra = {str(k): _jsonable(v) for k, v in row.items() if k not in core and k != "vector"}
            results.append({**core, **extra})  # the engine's own fields can never be overwritten
        out: dict[str, Any] = {"query": self.query, "results": results, "vote": self.vote.to_dict()}
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
) -> list[QueryResult]:
    """Search, then vote; `exclude_positions` leaves out given rows (an indexed case querying itself).

    Only the filter columns and the rows of the results are read from the shards.
    """
    allowed = filter_mask(idx, list(exclude_patients), list(where))
    if len(exclude_positions):
        allowed = np.ones(idx.count, dtype=bool) if allowed is None else allowed
        allowed[list(exclude_positions)] = False
    return _answer(idx, names, vectors, k, allowed, vote)


def query_files(
    idx: IndexDir,
    loaded: LoadedEncoder,
    paths: list[str],
    k: int,
    exclude_patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
    include_self: bool = False,
) -> tuple[list[QueryResult], list[str]]:
    """Query with image files; unreadable ones are reported, the others answered.

    Unless `include_self`, a query file that is itself in the index (same bytes, or the same path in
    an index without content hashes) is left out of its own results and vote, and so are the rows
    that share a near_dup_group with it.
    """
    results: list[QueryResult] = []
    errors: list[str] = []
    base = filter_mask(idx, list(exclude_patients), list(where))
    identity = None if include_self else _identity_columns(idx)  # read once for every query file
    for p in paths:
        try:
            names, vecs = embed_query_image(p, loaded)
        except UnreadableImageError as exc:
            errors.append(str(exc))
            continue
        own = None if identity is None else self_mask(identity, p)
        allowed = base if own is None else (~own if base is None else base & ~own)
        results += _answer(idx, names, vecs, k, allowed, vote)
    return results, errors


def _identity_columns(idx: IndexDir) -> pd.DataFrame:
    """The columns that tell an indexed image's identity (hash, path, near-duplicate group), live rows."""
    return idx.read_columns([c for c in (CONTENT_HASH, "path", "near_dup_group") if c in idx.columns])


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


def _answer(
    idx: IndexDir, names: list[str], vectors: np.ndarray, k: int, allowed: np.ndarray | None, vote: str
) -> list[QueryResult]:
    if allowed is not None and not allowed.any():
        raise RetrieveError("no indexed image is left after --exclude-patient/--where")
    matched = None if allowed is None else int(allowed.sum())
    labelled = has_labels(idx)
    out = []
    for name, hits in zip(names, search(idx, vectors, k, allowed)):
        rows = idx.fetch([h.row_id for h in hits])
        labels = [None if pd.isna(x) else str(x) for x in rows["label"]] if "label" in rows else [None] * len(hits)
        v = knn_vote(labels, [h.score for h in hits], vote) if labelled else no_label_vote()
        out.append(QueryResult(name, hits, rows, v, matched))
    return out


def has_labels(idx: IndexDir) -> bool:
    """Whether any indexed image has a label (from the manifest's label counts, nothing read)."""
    return any(k != "(unlabelled)" for k in idx.manifest.labels)
