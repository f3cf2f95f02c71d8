"""An index directory: vectors.parquet + index.faiss + manifest.json, built and updated atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

import retrieval
from indexer.atomic import atomic_path, staged_directory
from indexer.faiss_index import build_index, load_index, save_index
from indexer.store import VectorSet, read_vectors, write_vectors
from retrieval.config import IndexConfig
from retrieval.encoders.base import fingerprint_difference
from retrieval.errors import EncoderMismatchError, RetrieveError

MANIFEST = "manifest.json"
VECTORS = "vectors.parquet"
INDEX = "index.faiss"
METRIC = "cosine (inner product on L2-normalised vectors)"


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
    retrieve_version: str = retrieval.__version__
    faiss_version: str = faiss.__version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _label_counts(rows: pd.DataFrame) -> dict[str, int]:
    labels = rows["label"].fillna("(unlabelled)") if "label" in rows else pd.Series(dtype=str)
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}


def read_manifest(index_dir: Path) -> IndexManifest:
    path = Path(index_dir) / MANIFEST
    if not Path(index_dir).is_dir():
        raise RetrieveError(f"--index {index_dir}: no such index folder (build one with `retrieve index build`)")
    if not path.is_file():
        raise RetrieveError(f"--index {index_dir}: not an index folder ({MANIFEST} missing)")
    try:
        return IndexManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise RetrieveError(f"{path}: damaged manifest ({exc})") from None


def _write_all(folder: Path, vs: VectorSet, index: faiss.Index, manifest: IndexManifest) -> None:
    write_vectors(folder / VECTORS, vs)
    save_index(index, folder / INDEX)
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(manifest.to_json())


def check_can_build(index_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty index folder is only replaced on request."""
    if index_dir.exists() and any(index_dir.iterdir()) and not overwrite:
        raise RetrieveError(
            f"--index {index_dir}: already exists; pass --overwrite to rebuild it or use `retrieve index add`"
        )


def build_index_dir(index_dir: str | Path, vs: VectorSet, cfg: IndexConfig, overwrite: bool = False) -> IndexManifest:
    """Build the index in a staging folder and move it into place."""
    index_dir = Path(index_dir)
    if len(vs) == 0:
        raise RetrieveError("no vectors to index")
    check_can_build(index_dir, overwrite)
    index, kind, params = build_index(vs.vectors, cfg.kind, cfg, use_gpu=cfg.gpu)
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
    )
    with staged_directory(index_dir) as stage:
        _write_all(stage, vs, index, manifest)
    return manifest


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


def open_index_dir(index_dir: str | Path, use_gpu: bool = True) -> IndexDir:
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    vs = read_vectors(index_dir / VECTORS)
    index = load_index(index_dir / INDEX, use_gpu)
    if index.ntotal != len(vs) or manifest.count != len(vs):
        raise RetrieveError(
            f"--index {index_dir}: inconsistent ({len(vs)} vectors, {index.ntotal} in the FAISS index, "
            f"manifest says {manifest.count}); rebuild it"
        )
    return IndexDir(index_dir, manifest, vs, index)


def check_compatible(fingerprint: dict[str, Any], other: dict[str, Any], what: str) -> None:
    diff = fingerprint_difference(fingerprint, other)
    if diff:
        raise EncoderMismatchError(
            f"{what}: built with encoder {fingerprint.get('encoder')}, not {other.get('encoder')}: {diff}"
        )


def add_to_index_dir(index_dir: str | Path, new: VectorSet) -> tuple[IndexManifest, int]:
    """Append vectors without a rebuild: existing vectors stay, the FAISS index gets `add`ed to.

    Rows whose path and frame are already indexed are left out. Returns (manifest, rows added).
    """
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
        rows.loc[clash, "id"] = rows.loc[clash, "path"].astype(str) + rows.loc[clash, "id"].str.extract(
            r"(#\d+)$", expand=False
        ).fillna("")
    idx.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    merged = VectorSet(
        rows=pd.concat([old_rows, rows], ignore_index=True),
        vectors=np.vstack([idx.vectors.vectors, vectors]),
        fingerprint=idx.manifest.fingerprint,
        encoder_spec=idx.manifest.encoder_spec,
    )
    m = idx.manifest
    m.count, m.updated, m.labels = len(merged), _now(), _label_counts(merged.rows)
    with staged_directory(index_dir) as stage:
        _write_all(stage, merged, idx.index, m)
    return m, len(rows)
