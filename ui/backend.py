"""What the browser does, without Streamlit: open an index, query by upload or by indexed case,
thumbnails, summary. The page (ui/app.py) only renders these and caches them."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from indexer.index_dir import IndexDir, open_index_dir, read_manifest
from retrieval.data.dataset import CORE_COLUMNS
from retrieval.data.imageio import IMAGE_SUFFIXES, read_frame, read_frames
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.pipeline import LoadedEncoder, QueryResult, embed_frames, encoder_for_index, query_vectors

MAX_UPLOAD_MB = 50


@dataclass
class Session:
    """An opened index with the encoder that made it (proved identical by its fingerprint)."""

    idx: IndexDir
    encoder: LoadedEncoder

    @property
    def rows(self) -> pd.DataFrame:
        return self.idx.rows

    def metadata_columns(self) -> list[str]:
        return [c for c in self.rows.columns if c not in CORE_COLUMNS]


def open_session(index_dir: str | Path) -> Session:
    manifest = read_manifest(Path(index_dir))
    loaded = encoder_for_index(manifest.fingerprint, manifest.encoder_spec, f"index {index_dir}")
    return Session(open_index_dir(index_dir), loaded)


@dataclass
class Answer:
    result: QueryResult
    seconds: float  # embedding (uploads) + search + vote


def decode_upload(name: str, data: bytes) -> list[np.ndarray]:
    """Check type and size, then decode an uploaded file once into its grayscale frames."""
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise RetrieveError(
            f"{name}: unsupported file type '{suffix or 'none'}' (upload PNG, JPEG, BMP, TIFF or DICOM)"
        )
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise RetrieveError(f"{name}: {len(data) / 2**20:.0f} MB is over the {MAX_UPLOAD_MB} MB limit")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return read_frames(path)
        except UnreadableImageError as exc:
            raise RetrieveError(f"{name}: {exc.reason}") from None


def query_frame(
    session: Session,
    name: str,
    frame: np.ndarray,
    k: int,
    exclude_patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
) -> Answer:
    """One decoded frame as the query: embed, search, vote."""
    t0 = time.perf_counter()
    vector = embed_frames([frame], session.encoder)
    k = max(1, min(k, len(session.rows)))
    res = query_vectors(session.idx, [name], vector, k, list(exclude_patients), list(where), vote)[0]
    return Answer(res, time.perf_counter() - t0)


def query_indexed(
    session: Session,
    position: int,
    k: int,
    exclude_own_patient: bool = True,
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
) -> Answer:
    """An indexed case as the query, from its stored vector; itself (and its patient) left out."""
    t0 = time.perf_counter()
    row = session.rows.iloc[position]
    patient = row.get("patient_id")
    exclude = [str(patient)] if exclude_own_patient and isinstance(patient, str) and patient else []
    k = max(1, min(k, len(session.rows) - 1))
    res = query_vectors(
        session.idx,
        [str(row["id"])],
        session.idx.vectors.vectors[[position]],
        k,
        exclude,
        list(where),
        vote,
        exclude_positions=[position],
    )[0]
    return Answer(res, time.perf_counter() - t0)


def load_image(path: str, frame_index: Any = None, max_side: int | None = None) -> np.ndarray:
    """A case's image as uint8 grayscale, optionally shrunk so its longest side is max_side."""
    f = -1 if frame_index is None or pd.isna(frame_index) else int(frame_index)
    img = read_frame(path, f)
    if max_side and max(img.shape) > max_side:
        pil = Image.fromarray(img)
        pil.thumbnail((max_side, max_side))
        img = np.asarray(pil)
    return img


def find_cases(rows: pd.DataFrame, text: str, limit: int = 200) -> pd.DataFrame:
    """Rows whose id, path or patient_id contains `text` (case-insensitive)."""
    if not text.strip():
        return rows.head(limit)
    t = text.strip().lower()
    hit = np.zeros(len(rows), dtype=bool)
    for col in ("id", "path", "patient_id"):
        if col in rows:
            hit |= rows[col].astype("string").fillna("").str.lower().str.contains(t, regex=False).to_numpy()
    return rows[hit].head(limit)


def summary(session: Session) -> dict:
    m = session.idx.manifest
    return {
        "cases": m.count,
        "labels": m.labels,
        "encoder": m.fingerprint.get("encoder"),
        "kind": m.kind,
        "dim": m.dim,
        "created": m.created,
        "updated": m.updated,
        "patients": int(session.rows["patient_id"].nunique()) if "patient_id" in session.rows else 0,
    }
