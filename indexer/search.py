"""Search an index with candidate filters (exclude patients, metadata equality).

Filters become a FAISS IDSelector passed in the search parameters, so the index itself skips the
rows a query may not return; where an approximate index still returns fewer than min(k, allowed)
results, the allowed rows are searched exactly, so a filtered query returns k results whenever k match.

A filter COLUMN=VALUE matches the column's text exactly, except on a column that holds `|`-separated
sets (any of its values contains `|`, e.g. multi-label labels `kidney|liver`): there a row matches when
its set names every part of VALUE (parts stripped of spaces, order ignored), so `label=liver` finds
`liver` and `kidney|liver`, and `label=kidney|liver` finds the rows naming both. An empty VALUE matches
the rows with no value, as on any column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pandas as pd

from indexer.errors import RetrieveError
from indexer.faiss_index import cpu_twin, search_device, search_parameters
from indexer.index_dir import IndexDir


@dataclass(frozen=True)
class Hit:
    position: int  # place of the row among the index's live rows (IndexDir.rows)
    score: float  # cosine similarity
    row_id: int = -1  # the row's stable id


def parse_where(expressions: list[str]) -> list[tuple[str, str]]:
    out = []
    for expr in expressions:
        col, sep, value = expr.partition("=")
        if not sep or not col.strip():
            raise RetrieveError(f"--where {expr!r}: expected COLUMN=VALUE")
        out.append((col.strip(), value.strip()))
    return out


SET_SEPARATOR = "|"


def _as_text(series: pd.Series) -> pd.Series:
    return series.astype("string").fillna("")


def set_members(text: str) -> frozenset[str]:
    """The parts of a `|`-separated set, each stripped of spaces; empty parts are not members."""
    return frozenset(part for part in (p.strip() for p in str(text).split(SET_SEPARATOR)) if part)


def holds_sets(values: pd.Series) -> bool:
    """Whether a column holds `|`-separated sets: any of its values contains `|`."""
    return bool(_as_text(values).str.contains(SET_SEPARATOR, regex=False).any())


def _set_hit(text: pd.Series, col: str, value: str) -> np.ndarray:
    """Rows of a set column whose set names every part of `value` (computed once per distinct value)."""
    wanted = [p.strip() for p in value.split(SET_SEPARATOR)]
    if not all(wanted):
        raise RetrieveError(
            f"--where {col}={value}: an empty part; {col} holds sets, so give one value or several as 'a|b'"
        )
    codes, uniques = pd.factorize(text)
    members = [set_members(u) for u in uniques]
    known = sorted(set().union(*members)) if members else []
    unknown = [w for w in dict.fromkeys(wanted) if w not in known]
    if unknown:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise RetrieveError(
            f"--where {col}={value}: unknown {col} '{unknown[0]}' (values in the index's {col} sets: {shown})"
        )
    need = set(wanted)
    good = np.array([need <= m for m in members] + [False], dtype=bool)  # the extra slot: factorize's -1
    hit = good[codes]
    if not hit.any():
        raise RetrieveError(f"--where {col}={value}: no image's {col} names all of {', '.join(dict.fromkeys(wanted))}")
    return hit


def candidate_mask(
    rows: pd.DataFrame, exclude_patients: Sequence[str] = (), where: Sequence[tuple[str, str]] = ()
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
        if value and holds_sets(text):
            mask &= _set_hit(text, col, value)
            continue
        hit = (text == value).to_numpy()
        if not hit.any():
            known = sorted(set(text) - {""})
            shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise RetrieveError(f"--where {col}={value}: unknown {col} '{value}' (values in the index: {shown})")
        mask &= hit
    return None if mask.all() else mask


def filter_mask(
    idx: IndexDir, exclude_patients: Sequence[str] = (), where: Sequence[tuple[str, str]] = ()
) -> np.ndarray | None:
    """candidate_mask over the index's live rows, reading only the columns the filters name."""
    if not exclude_patients and not where:
        return None
    for col, value in where:
        if col not in idx.columns:
            raise RetrieveError(f"--where {col}={value}: unknown column '{col}' (columns: {', '.join(idx.columns)})")
    needed = (["patient_id"] if exclude_patients else []) + [c for c, _ in where]
    return candidate_mask(idx.read_columns(list(dict.fromkeys(needed))), list(exclude_patients), list(where))


def search(idx: IndexDir, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Hit]]:
    """k nearest allowed rows for each query vector, best first; `allowed` is a mask over live rows."""
    n = idx.count
    if k < 1:
        raise RetrieveError(f"--k {k}: must be at least 1")
    if k > n:
        raise RetrieveError(f"--k {k}: larger than the {n} images in the index")
    params = idx.manifest.params
    tombstones = idx.removed if params.get("removal") == "tombstone" else np.zeros(0, dtype=np.int64)
    selector: Any = None
    want = k
    if allowed is not None:
        n_allowed = int(allowed.sum())
        want = min(k, n_allowed)
        if n_allowed <= n // 2:
            selector = faiss.IDSelectorBatch(idx.live_ids[allowed])
        else:
            blocked = np.concatenate([idx.live_ids[~allowed], tombstones])
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(blocked))
    elif len(tombstones):
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(tombstones))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    index = idx.index
    if selector is not None and search_device(index) != "cpu":  # GPU indexes take no IDSelector
        index = cpu_twin(index)
    idx.search_device = search_device(index)
    sp = search_parameters(index, k, params, selector)
    # faiss.contrib.torch_utils (imported by e.g. pytorch-metric-learning) swaps Index.search process-wide
    # for a version without `params`; the numpy original stays reachable as search_numpy
    search_fn = getattr(index, "search_numpy", index.search)
    scores, ids = search_fn(q, k, params=sp)
    results = []
    for qi, (srow, irow) in enumerate(zip(scores, ids)):
        keep = irow >= 0
        found = irow[keep]
        hits = [Hit(int(p), float(s), int(i)) for p, s, i in zip(idx.positions(found), srow[keep], found, strict=True)]
        if len(hits) < want:
            hits = _exact(idx, q[qi], allowed, want)
        results.append(hits[:k])
    return results


def _exact(idx: IndexDir, query: np.ndarray, allowed: np.ndarray | None, k: int) -> list[Hit]:
    """Brute-force inner product over the allowed rows (the fallback for approximate indexes)."""
    vectors = idx.vectors.vectors
    candidates = np.arange(len(vectors)) if allowed is None else np.flatnonzero(allowed)
    sims = vectors[candidates] @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return [Hit(int(candidates[j]), float(sims[j]), int(idx.live_ids[candidates[j]])) for j in order]
