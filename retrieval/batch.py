"""Batch queries: every image of a folder or manifest queries the index, embedded in batches and searched
in one FAISS batch; the answers become one table (a row per query and rank, with the vote) for CSV/Parquet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from indexer.atomic import atomic_path
from indexer.index_dir import IndexDir
from retrieval.data.dataset import Skipped, load_dataset
from retrieval.embed import embed_rows, pick_device
from retrieval.errors import RetrieveError
from retrieval.labels import label_set, set_text
from retrieval.pipeline import (
    LoadedEncoder,
    QueryResult,
    _allowed,
    _answer,
    _identity_columns,
    resolve_data_root,
    self_mask,
)

log = logging.getLogger(__name__)

OUT_SUFFIXES = (".csv", ".parquet")
# the hit's columns every table has, in this order; the hit's other columns follow, then the vote
TABLE_CORE = ("query", "rank", "score", "id", "path", "label", "patient_id")


@dataclass
class BatchAnswer:
    results: list[QueryResult]
    query_labels: list[str | None]  # the query images' own labels, where the source had them
    skipped: list[Skipped] = field(default_factory=list)


def is_query_source(path: str | Path) -> bool:
    """A folder or a manifest (CSV/Parquet) of query images, rather than an image file."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in (".csv", ".parquet")


def query_source(
    idx: IndexDir,
    loaded: LoadedEncoder,
    source: str | Path,
    k: int,
    exclude_patients: list[str] | tuple[str, ...] = (),
    where: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    vote: str = "majority",
    include_self: bool = False,
    *,
    group_by: str | None = None,
    agg: str = "max",
    data_root: str | Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    use_gpu: bool = True,
    progress: bool = False,
) -> BatchAnswer:
    """Every image (every frame of a clip) of a folder or manifest as a query; one FAISS batch for all.

    Each query leaves out its own file (same bytes) and its near-duplicates unless `include_self`.
    """
    allowed = _allowed(idx, exclude_patients, where)
    root = resolve_data_root(idx, data_root)
    table = load_dataset(source)
    emb = embed_rows(
        table.rows, loaded.encoder, loaded.preprocess, batch_size, workers, pick_device(use_gpu), progress, "queries"
    )
    if len(emb.rows) == 0:
        first = f"; first: {emb.skipped[0]}" if emb.skipped else ""
        raise RetrieveError(f"{source}: none of the {len(table.rows)} query images could be read{first}")
    identity = None if include_self else _identity_columns(idx, root)
    own_by_path: dict[str, np.ndarray] = {}
    own = []
    for p in emb.rows["path"].astype(str):
        if p not in own_by_path:
            mask = None if identity is None else self_mask(identity, p)
            own_by_path[p] = idx.live_ids[mask] if mask is not None else np.zeros(0, dtype=np.int64)
        own.append(own_by_path[p])
    names = emb.rows["id"].astype(str).tolist()
    results = _answer(idx, names, emb.vectors, k, allowed, vote, own, group_by, agg, root)
    labels = [None if pd.isna(x) else str(x) for x in emb.rows["label"]]
    return BatchAnswer(results, labels, table.skipped + emb.skipped)


def query_set_texts(labels: list[str | None], names: list[str]) -> list[str | None]:
    """Query labels in the text a multi-label vote writes (classes sorted, joined by '|'): ' liver | kidney'
    -> 'kidney|liver'. A label with an empty class part is kept as written, with a note (logged)."""
    out: list[str | None] = []
    for label, name in zip(labels, names):
        if label is None or not label.strip():
            out.append(label)
            continue
        try:
            out.append(set_text(label_set(label)))
        except RetrieveError as exc:
            log.info("query %s: %s; query_label written as given", name, exc)
            out.append(label)
    return out


def results_table(results: list[QueryResult], query_labels: list[str | None] | None = None) -> pd.DataFrame:
    """One row per query and rank: the hit (its score and row, with the case when grouped) and the query's vote.
    On a multi-label index (the votes are sets) `query_label` is in the vote's set text (query_set_texts), so
    it compares with `vote_label` as text."""
    if query_labels is not None and any(r.vote.labels is not None for r in results):
        query_labels = query_set_texts(query_labels, [r.query for r in results])
    records: list[dict[str, Any]] = []
    for j, res in enumerate(results):
        d = res.to_dict()
        v = d["vote"]
        votes = {
            "vote_label": v["label"],
            "vote_confidence": v["confidence"],
            "vote_note": v.get("note"),
        }
        query_label = {"query_label": query_labels[j]} if query_labels is not None else {}
        for hit in d["results"]:
            row = {"query": d["query"], **query_label, **{c: hit.get(c) for c in TABLE_CORE if c != "query"}}
            row.update({c: _flat(x) for c, x in hit.items() if c not in row})
            records.append({**row, **votes})
    return pd.DataFrame.from_records(records)


def _flat(value: Any) -> Any:
    """A JSON value as a table cell (lists and objects as JSON text)."""
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return value


def write_results(table: pd.DataFrame, out: str | Path) -> Path:
    """The results table as CSV or Parquet (by suffix), written atomically."""
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise RetrieveError(f"--out {out}: give a .csv or .parquet file")
    if not out.parent.is_dir():
        raise RetrieveError(f"--out {out}: no folder {out.parent}")
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.astype({c: "string" for c in table.columns if table[c].dtype == object}).to_parquet(tmp, index=False)
    return out
