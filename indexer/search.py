"""Search an index with candidate filters (exclude patients, metadata equality).

Filters become a FAISS IDSelector passed in the search parameters, so the index itself skips the
rows a query may not return; where an approximate index still returns fewer than min(k, allowed)
results, the allowed rows are searched exactly, so a filtered query returns k results whenever k match.

A filter COLUMN=VALUE matches the column's text exactly, except on the `label` column (SET_COLUMN) when
it holds `|`-separated sets (any label contains `|`, e.g. multi-label labels `kidney|liver`): there a row
matches when its set names every part of VALUE (parts stripped of spaces, order ignored), so `label=liver`
finds `liver` and `kidney|liver`, and `label=kidney|liver` finds the rows naming both. `label` is the one
column whose `|` means a set: the indexer knows that column name as a plain convention (the retrieval layer's
labels), nothing else about labels; every other column (a manifest's free text such as `ABDOMEN | LIVER`)
keeps the exact-text match whatever its values hold. COLUMN==VALUE asks for the exact form: on `label` the
rows whose set equals VALUE's (`label==liver`: labelled exactly {liver}, not `kidney|liver`; order and spaces
normalised), on any other column the exact text, as `=`. An empty VALUE matches the rows with no value.

A column that names people (indexer.privacy.is_person_name_column: PatientName, surname, physician, ...) is no
filter: a condition on it is refused with an error that names the column and no value, so a filter cannot tell
whether a name is in the index, and no error lists such a column's values.
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
from indexer.privacy import is_person_name_column


@dataclass(frozen=True)
class Hit:
    position: int  # place of the row among the index's live rows (IndexDir.rows)
    score: float  # cosine similarity
    row_id: int = -1  # the row's stable id


def parse_where(expressions: list[str]) -> list[tuple[str, str]]:
    """`COLUMN=VALUE` -> (COLUMN, VALUE); `COLUMN==VALUE` -> (COLUMN, "=" + VALUE): a value that starts with
    EXACT ('=') asks for the exact match (candidate_mask)."""
    out = []
    for expr in expressions:
        col, sep, value = expr.partition("=")
        if not sep or not col.strip():
            raise RetrieveError(f"--where {expr!r}: expected COLUMN=VALUE or COLUMN==VALUE")
        value = value.strip()
        if value.startswith(EXACT):
            value = EXACT + value[1:].strip()
        out.append((col.strip(), value))
    return out


SET_SEPARATOR = "|"
SET_COLUMN = "label"  # the one column whose `|` means a set of classes
EXACT = "="  # a where value starting with it (COLUMN==VALUE) asks for the exact match


def _as_text(series: pd.Series) -> pd.Series:
    return series.astype("string").fillna("")


def set_parts(text: str) -> list[str]:
    """The parts of a `|`-separated set as written, each stripped of spaces, empty ones included (`a||b` ->
    a, '', b): the one splitting of the format (retrieval.labels refuses empty parts, set_members drops them)."""
    return [part.strip() for part in str(text).split(SET_SEPARATOR)]


def set_members(text: str) -> frozenset[str]:
    """The parts of a `|`-separated set, each stripped of spaces; empty parts are not members."""
    return frozenset(part for part in set_parts(text) if part)


def holds_sets(values: pd.Series, column: str | None = None) -> bool:
    """Whether a column holds `|`-separated sets: it is the `label` column (SET_COLUMN; `column` names the
    column, by default `values.name`; an unnamed series is judged by its values alone) and any of its values
    contains `|`. Every other column is plain text, `|` or not."""
    name = values.name if column is None else column
    if name is not None and name != SET_COLUMN:
        return False
    return bool(_as_text(values).str.contains(SET_SEPARATOR, regex=False).any())


FILE_COLUMNS = ("id", "path", "rel_path", "sop_uid")  # columns naming files, whose values a `where` error never lists


def _shown(values: list[str]) -> str:
    return ", ".join(values[:12]) + (", ..." if len(values) > 12 else "")


def _set_hit(text: pd.Series, col: str, value: str, exact: bool = False) -> np.ndarray:
    """Rows of a set column whose set names every part of `value`, or (`exact`) equals value's set (computed
    once per distinct value)."""
    op = "==" if exact else "="
    wanted = set_parts(value)
    if not all(wanted):
        raise RetrieveError(
            f"--where {col}{op}{value}: an empty part; {col} holds sets, so give one value or several as 'a|b'"
        )
    codes, uniques = pd.factorize(text)
    members = [set_members(u) for u in uniques]
    known = sorted(set().union(*members)) if members else []
    unknown = [w for w in dict.fromkeys(wanted) if w not in known]
    if unknown:
        raise RetrieveError(
            f"--where {col}{op}{value}: unknown {col} '{unknown[0]}' "
            f"(values in the index's {col} sets: {_shown(known)})"
        )
    need = frozenset(wanted)
    good = np.array([(need == m if exact else need <= m) for m in members] + [False], dtype=bool)  # -1: no value
    hit = good[codes]
    if not hit.any():
        named = ", ".join(dict.fromkeys(wanted))
        raise RetrieveError(
            f"--where {col}{op}{value}: no image's {col} is exactly {{{named}}}"
            if exact
            else f"--where {col}={value}: no image's {col} names all of {named}"
        )
    return hit


def refuse_person_names(where: Sequence[tuple[str, str]]) -> None:
    """A one-line error for a `where` condition on a person-name column; it names the column, never a value
    (neither the caller's nor the index's)."""
    for col, _ in where:
        if is_person_name_column(col):
            raise RetrieveError(f"--where {col}: {col} holds person names, which cannot be used as a filter")


def _filter_columns(columns: Sequence[str]) -> str:
    """The columns a `where` may name, for an error message (no vector, no person-name columns)."""
    return ", ".join(c for c in columns if c != "vector" and not is_person_name_column(c))


def candidate_mask(
    rows: pd.DataFrame, exclude_patients: Sequence[str] = (), where: Sequence[tuple[str, str]] = ()
) -> np.ndarray | None:
    """Boolean mask of rows a query may return, or None when every row may (conditions: module docstring;
    a value starting with EXACT is the COLUMN==VALUE form)."""
    refuse_person_names(where)
    mask = np.ones(len(rows), dtype=bool)
    if exclude_patients:
        mask &= ~_as_text(rows["patient_id"]).isin(list(exclude_patients)).to_numpy()
    for col, value in where:
        if col not in rows.columns or col == "vector":
            raise RetrieveError(
                f"--where {col}={value}: unknown column '{col}' (columns: {_filter_columns(list(rows.columns))})"
            )
        mask &= condition_mask(rows[col], col, value)
    return None if mask.all() else mask


def condition_mask(values: pd.Series, col: str, value: str) -> np.ndarray:
    """The rows of one column that one `where` condition (col, value) keeps; an error when none does (listing
    the column's values; a person-name column is refused first, so its values are never listed)."""
    refuse_person_names([(col, value)])
    text = _as_text(values)
    exact = value.startswith(EXACT)
    if exact:
        value = value[len(EXACT) :]
    if value and col == SET_COLUMN and (exact or holds_sets(text, col)):
        return _set_hit(text, col, value, exact)
    hit = (text == value).to_numpy()
    if not hit.any():
        where = f"--where {col}{'==' if exact else '='}{value}: unknown {col} '{value}'"
        if col in FILE_COLUMNS:  # one value per image, and a path can name a person's folder: never listed
            raise RetrieveError(f"{where} (no indexed image has it)")
        present = sorted(set(text) - {""})
        raise RetrieveError(
            f"{where} "
            + (f"(values in the index: {_shown(present)})" if present else "(no indexed image has a value in it)")
        )
    return hit


EMPTY_INDEX = "the index is empty (every row was removed, or none was added): add images first"


def check_k(k: int, count: int, flag: str = "--k") -> None:
    """A one-line error for a k below 1 or above the index's image count (an empty index said as such)."""
    if k < 1:
        raise RetrieveError(f"{flag} {k}: must be at least 1")
    if count == 0:
        raise RetrieveError(EMPTY_INDEX)
    if k > count:
        raise RetrieveError(f"{flag} {k}: larger than the {count} images in the index")


def filter_mask(
    idx: IndexDir, exclude_patients: Sequence[str] = (), where: Sequence[tuple[str, str]] = ()
) -> np.ndarray | None:
    """candidate_mask over the index's live rows, reading only the columns the filters name."""
    if not exclude_patients and not where:
        return None
    refuse_person_names(where)
    for col, value in where:
        if col not in idx.columns:
            raise RetrieveError(
                f"--where {col}={value}: unknown column '{col}' (columns: {_filter_columns(list(idx.columns))})"
            )
    needed = (["patient_id"] if exclude_patients else []) + [c for c, _ in where]
    return candidate_mask(idx.read_columns(list(dict.fromkeys(needed))), list(exclude_patients), list(where))


def search(idx: IndexDir, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Hit]]:
    """k nearest allowed rows for each query vector, best first; `allowed` is a mask over live rows."""
    n = idx.count
    check_k(k, n)
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
