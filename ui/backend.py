"""What the browser does, without Streamlit: open an index, query by upload or by indexed case,
thumbnails, summary. The page (ui/app.py) only renders these and caches them."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from indexer.index_dir import IndexDir, open_index_dir, read_manifest
from indexer.privacy import is_person_name_column, person_name_columns
from indexer.search import EMPTY_INDEX, holds_sets, set_members
from retrieval.data.dataset import CORE_COLUMNS
from retrieval.data.imageio import DICOM_SUFFIXES, IMAGE_SUFFIXES, read_frame, read_frames
from retrieval.data.limits import MAX_UPLOAD_MB, limits
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.evaluation.report import UNLABELLED, label_colours
from retrieval.pipeline import (
    CONTENT_HASH,
    LoadedEncoder,
    QueryResult,
    embed_frames,
    encoder_for_index,
    has_labels,
    query_vectors,
)
from retrieval.relocate import REL_PATH, resolve_data_root, resolve_paths
from retrieval.server.uploads import sniff_kind
from retrieval.vote import MULTILABEL_SHARE, Vote


@dataclass
class Session:
    """An opened index with the encoder that made it (proved identical by its fingerprint), and where its
    files are now (`root`: the --data-root given, or found as relocate.resolve_data_root finds it)."""

    idx: IndexDir
    encoder: LoadedEncoder
    root: Path | None = None

    @cached_property
    def rows(self) -> pd.DataFrame:
        """The indexed rows, each `path` where the file is now, without person-name columns (an index built
        before they were dropped at ingest may still hold them: the browser never shows them)."""
        rows = resolve_paths(self.idx.rows, self.root)
        return rows.drop(columns=person_name_columns(rows.columns))

    def metadata_columns(self) -> list[str]:
        """The columns the browser offers as filters and shows on cards (never a person-name column)."""
        return [
            c
            for c in self.rows.columns
            if c not in CORE_COLUMNS and c not in (CONTENT_HASH, REL_PATH) and not is_person_name_column(c)
        ]

    @property
    def labelled(self) -> bool:
        """Whether any indexed image has a label (an index without labels has no vote)."""
        return has_labels(self.idx)

    def label_colours(self) -> dict[str, str]:
        """Every label of the index -> its colour (the fixed palette over the sorted labels), so a label
        keeps its colour in every chart, whichever labels a query's neighbours happen to have."""
        labels = self.rows["label"].astype("string").fillna(UNLABELLED) if "label" in self.rows else []
        return label_colours(labels)


def open_session(index_dir: str | Path, data_root: str | Path | None = None) -> Session:
    """`data_root`: where the indexed files are now, when they moved without the index (must hold them)."""
    manifest = read_manifest(Path(index_dir))
    idx = open_index_dir(index_dir)
    root = resolve_data_root(idx, data_root)
    loaded = encoder_for_index(manifest.fingerprint, manifest.encoder_spec, f"index {index_dir}")
    return Session(idx, loaded, root)


@dataclass
class Answer:
    result: QueryResult
    seconds: float  # embedding (uploads) + search + vote


def upload_limit_mb(server_max_mb: int | None = None) -> int:
    """The upload limit in MB: MAX_UPLOAD_MB, or the web server's own lower limit when it has one."""
    return min(MAX_UPLOAD_MB, server_max_mb) if server_max_mb else MAX_UPLOAD_MB


def upload_limit_text(max_mb: int = MAX_UPLOAD_MB) -> str:
    """What the upload widget says: the file types and the limits decode_upload and the readers apply."""
    lim = limits()
    return (
        f"PNG, JPEG, BMP, TIFF or DICOM; up to {max_mb} MB, {lim.max_pixels / 1e6:g} megapixels per frame "
        f"and {lim.max_frames:,} frames"
    )


def is_dicom_bytes(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def upload_suffix(data: bytes) -> str | None:
    """The file type of an upload from its first bytes, as the server sniffs it (retrieval.server.uploads:
    PNG, JPEG, DICOM), plus the BMP and TIFF the browser also reads; None for anything else."""
    kind = sniff_kind(data[:132])
    if kind is not None:
        return {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}[kind]
    if data.startswith(b"BM"):
        return ".bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return ".tif"
    return None


def decode_upload(name: str, data: bytes, max_mb: int = MAX_UPLOAD_MB) -> list[np.ndarray]:
    """Check type and size, then decode an uploaded file once into its grayscale frames. The type comes from
    the bytes, never the name (PACS exports have no suffix; a PNG named x.dcm is a PNG); only a DICOM file
    written without its preamble, which no magic number marks, is taken at its .dcm/.dicom suffix."""
    name = name or "upload"
    if len(data) > max_mb * 1024 * 1024:
        raise RetrieveError(f"{name}: {len(data) / 2**20:.0f} MB is over the {max_mb} MB limit")
    suffix = upload_suffix(data)
    if suffix is None:
        given = Path(name).suffix.lower()
        if given not in IMAGE_SUFFIXES:
            raise RetrieveError(
                f"{name}: unsupported file type '{given or 'none'}' (upload PNG, JPEG, BMP, TIFF or DICOM)"
            )
        if given not in DICOM_SUFFIXES:
            raise RetrieveError(f"{name}: not a readable image (its bytes are no PNG, JPEG, BMP, TIFF or DICOM)")
        suffix = given
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return read_frames(path)
        except UnreadableImageError as exc:
            raise RetrieveError(f"{name}: {exc.reason}") from None


def own_positions(session: Session, digest: str | None = None, position: int | None = None) -> list[int]:
    """The rows that are the query itself: the uploaded bytes' SHA-256 `digest` (the same file anywhere in
    the index, every frame of it) or the indexed case at `position`, with the rows that share a
    near_dup_group with any of them."""
    rows = session.rows
    same = np.zeros(len(rows), dtype=bool)
    if digest is not None and CONTENT_HASH in rows:
        same |= (rows[CONTENT_HASH] == digest).to_numpy(dtype=bool)
    if position is not None:
        same[position] = True
        if CONTENT_HASH in rows and isinstance(rows[CONTENT_HASH].iloc[position], str):
            same |= (rows[CONTENT_HASH] == rows[CONTENT_HASH].iloc[position]).to_numpy(dtype=bool)
    if "near_dup_group" in rows and same.any():
        groups = set(rows.loc[same, "near_dup_group"].dropna().astype(str)) - {""}
        same |= rows["near_dup_group"].astype("string").isin(groups).fillna(False).to_numpy(dtype=bool)
    return np.flatnonzero(same).tolist()


def upload_digest(data: bytes) -> str:
    """The SHA-256 of an upload's bytes, as the index's content_sha256 column records files."""
    return hashlib.sha256(data).hexdigest()


def query_frame(
    session: Session,
    name: str,
    frame: np.ndarray,
    k: int,
    exclude_patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
    digest: str | None = None,
    include_self: bool = False,
) -> Answer:
    """One decoded frame as the query: embed, search, vote. Unless `include_self`, the uploaded file
    itself (by its bytes' `digest`) and its near-duplicates are left out of the results and the vote."""
    t0 = time.perf_counter()
    frame = np.asarray(frame)
    if frame.ndim != 2 or frame.size == 0:
        raise RetrieveError(
            f"{name}: a query frame is one non-empty grayscale image, not an array of shape {frame.shape}"
        )
    if len(session.rows) == 0:
        raise RetrieveError(EMPTY_INDEX)
    own = [] if include_self else own_positions(session, digest)
    if len(session.rows) - len(own) < 1:
        raise RetrieveError(
            f"{name}: every indexed image is this query or its near-duplicate; include the query itself to see them"
        )
    vector = embed_frames([frame], session.encoder)
    k = max(1, min(k, len(session.rows) - len(own)))
    res = query_vectors(
        session.idx,
        [name],
        vector,
        k,
        list(exclude_patients),
        list(where),
        vote,
        exclude_positions=own,
        data_root=session.root,
    )[0]
    return Answer(_without_names(res), time.perf_counter() - t0)


def query_indexed(
    session: Session,
    position: int,
    k: int,
    exclude_own_patient: bool = True,
    where: Sequence[tuple[str, str]] = (),
    vote: str = "majority",
    include_self: bool = False,
) -> Answer:
    """An indexed case as the query, from its stored vector; unless `include_self`, itself and its
    near-duplicates (same file, same near_dup_group) left out, and its patient when asked."""
    t0 = time.perf_counter()
    n = len(session.rows)
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not 0 <= position < n:
        raise RetrieveError(f"no indexed case at position {position!r}: the index holds {n} (positions 0 to {n - 1})")
    row = session.rows.iloc[position]
    patient = row.get("patient_id")
    exclude = [str(patient)] if exclude_own_patient and isinstance(patient, str) and patient else []
    own = [] if include_self else own_positions(session, position=position)
    if n - len(own) < 1:
        raise RetrieveError(
            f"case {row['id']}: every indexed image is this case or its near-duplicate; include the query itself"
        )
    k = max(1, min(k, n - len(own)))
    res = query_vectors(
        session.idx,
        [str(row["id"])],
        session.idx.vectors.vectors[[position]],
        k,
        exclude,
        list(where),
        vote,
        exclude_positions=own,
        data_root=session.root,
    )[0]
    return Answer(_without_names(res), time.perf_counter() - t0)


def _without_names(result: QueryResult) -> QueryResult:
    """The result without the person-name columns an old index may hold (the browser never shows them)."""
    names = person_name_columns(result.rows.columns)
    return replace(result, rows=result.rows.drop(columns=names)) if names else result


def case_fields(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (field, value) pairs the case view lists: every field but the vector and person-name columns."""
    return [(str(k), v) for k, v in row.items() if k != "vector" and not is_person_name_column(k)]


def load_image(
    path: str, frame_index: Any = None, max_side: int | None = None, root: str | Path | None = None
) -> np.ndarray:
    """A case's image as uint8 grayscale, optionally shrunk so its longest side is max_side. With a data
    `root` (Session.root), a file that lies outside it, links followed, is refused, as the server refuses it."""
    if max_side is not None and max_side < 1:
        raise RetrieveError(f"max_side {max_side}: must be at least 1 pixel")
    if root is not None:
        base = Path(root).resolve()
        try:
            real = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            real = None
        if real is None or not real.is_relative_to(base):
            raise UnreadableImageError(Path(path).name, "the file lies outside the data root")
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
        "labels": {k: v for k, v in m.labels.items() if k != UNLABELLED},
        "unlabelled": m.labels.get(UNLABELLED, 0),
        "encoder": m.fingerprint.get("encoder"),
        "kind": m.kind,
        "dim": m.dim,
        "created": m.created,
        "updated": m.updated,
        "patients": int(session.rows["patient_id"].nunique()) if "patient_id" in session.rows else 0,
    }


def filter_choices(rows: pd.DataFrame, col: str) -> tuple[str, list[str]]:
    """The filter's caption and the values offered for `col`: its distinct values, or, on a column of
    `|`-separated sets (multi-label labels), its classes, since `label=liver` then keeps every image whose
    set names liver (indexer.search.candidate_mask). A person-name column is never offered (a one-line error)."""
    if is_person_name_column(col):
        raise RetrieveError(f"{col} holds person names, which the browser never shows or filters by")
    values = rows[col].astype("string").dropna()
    if holds_sets(values):
        return f"{col} includes", sorted(set().union(*(set_members(v) for v in values.unique())))
    return f"{col} =", sorted(values.unique().tolist())


@dataclass
class VoteView:
    """What the vote panel shows. `headline`: the suggestion (None: there is none, `message` says why);
    `detail`: the line under it; `bars`: (label, value) per voted label or class, for the chart, whose
    axis is `axis` (vote weights for one label per image, shares of the vote for label sets)."""

    headline: str | None
    detail: str
    bars: pd.DataFrame
    axis: str
    message: str | None = None
    multilabel: bool = False


def _pct(share: float) -> str:
    return f"{share:.0%}"


def vote_view(vote: Vote, n_hits: int) -> VoteView:
    """The vote as the browser shows it. One label per image: the winner and its share of the votes. A set
    vote (multi-label index): each suggested class with its own share, or that no class has at least half
    of the votes, with every class's share in the chart either way."""
    bars = pd.DataFrame({"label": list(vote.votes), "votes": [float(v) for v in vote.votes.values()]})
    cases = f"{n_hits} similar case{'s' if n_hits != 1 else ''}"
    if vote.labels is None:
        if vote.label is None:
            return VoteView(None, "", bars.iloc[:0], "votes", vote.note or "No labelled neighbours to vote.")
        return VoteView(
            f"Suggested label: **{vote.label}**", f"{vote.confidence:.0%} of the votes of {cases}", bars, "votes"
        )
    rule = f"a class is suggested when at least {_pct(MULTILABEL_SHARE)} of the votes name it"
    axis = "share of the votes"
    if vote.labels:
        shares = ", ".join(f"{c} {_pct(vote.votes[c])}" for c in vote.labels)
        names = ", ".join(f"**{c}**" for c in vote.labels)
        return VoteView(
            f"Suggested classes: {names}", f"{shares} of the votes of {cases} ({rule})", bars, axis, None, True
        )
    if not vote.votes:  # no labelled neighbour voted
        return VoteView(None, "", bars, axis, vote.note or "No labelled neighbours to vote.", True)
    shares = ", ".join(f"{c} {_pct(w)}" for c, w in vote.votes.items())
    message = f"No class has at least {_pct(MULTILABEL_SHARE)} of the votes of {cases} ({shares}), so no suggestion."
    return VoteView(None, "", bars, axis, message, True)
