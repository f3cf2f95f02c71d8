"""Search an index with candidate filters (exclude patients, metadata equality), exact for flat indexes.

Filtering over-fetches: with m disallowed rows, the k + m nearest always hold the k nearest allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from indexer.errors import RetrieveError
from indexer.faiss_index import set_search_depth
from indexer.index_dir import IndexDir


@dataclass(frozen=True)
class Hit:
    position: int  # row in the index's vectors table
    score: float  # cosine similarity


def parse_where(expressions: list[str]) -> list[tuple[str, str]]:
    out = []
    for expr in expressions:
        col, sep, value = expr.partition("=")
        if not sep or not col.strip():
            raise RetrieveError(f"--where {expr!r}: expected COLUMN=VALUE")
        out.append((col.strip(), value.strip()))
    return out


def _as_text(series: pd.Series) -> pd.Series:
    return series.astype("string").fillna("")


def candidate_mask(
    rows: pd.DataFrame, exclude_patients: list[str] = (), where: list[tuple[str, str]] = ()
) -> np.ndarray | None:
    """Boolean mask of rows a query may return, or None when every row may."""
    mask = np.ones(len(rows), dtype=bool)
    if exclude_patients:
        mask &= ~_as_text(rows["patient_id"]).isin(list(exclude_patients)).to_numpy()
    for col, value in where:
        if col not in rows.columns or col == "vector":
            cols = [c for c in rows.columns if c != "vector"]
            raise RetrieveError(f"--where {col}={value}: unknown column '{col}' (columns: {', '.join(cols)})")
        text = _as_text(rows[col])
        hit = (text == value).to_numpy()
        if not hit.any():
            known = sorted(set(text) - {""})
            shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise RetrieveError(f"--where {col}={value}: unknown {col} '{value}' (values in the index: {shown})")
        mask &= hit
    return None if mask.all() else mask


def search(idx: IndexDir, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Hit]]:
    """k nearest allowed rows for each query vector, best first.

    With filters, FAISS is asked for k + (number of blocked rows), which holds the k nearest allowed
    rows on an exact index; where an approximate index returns fewer than min(k, allowed rows), the
    allowed rows are searched exactly instead, so a filtered query returns k results whenever k match.
    """
    n = idx.index.ntotal
    if k < 1:
        raise RetrieveError(f"--k {k}: must be at least 1")
    if k > n:
        raise RetrieveError(f"--k {k}: larger than the {n} images in the index")
    blocked = 0 if allowed is None else int((~allowed).sum())
    fetch = min(n, k + blocked)
    want = min(k, n - blocked)
    set_search_depth(idx.index, fetch, idx.manifest.params)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, positions = idx.index.search(q, fetch)
    results = []
    for qi, (srow, prow) in enumerate(zip(scores, positions)):
        hits = [Hit(int(p), float(s)) for s, p in zip(srow, prow) if p >= 0 and (allowed is None or allowed[p])]
        if len(hits) < want:
            hits = _exact(idx.vectors.vectors, q[qi], allowed, want)
        results.append(hits[:k])
    return results


def _exact(vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray | None, k: int) -> list[Hit]:
    """Brute-force inner product over the allowed rows (the fallback for approximate indexes)."""
    candidates = np.arange(len(vectors)) if allowed is None else np.flatnonzero(allowed)
    sims = vectors[candidates] @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return [Hit(int(candidates[j]), float(sims[j])) for j in order]
