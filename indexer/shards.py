"""Vectors as Parquet shards: one file per write, fixed row groups, a stable int64 `row_id` per row.

A shard is an ordinary Parquet file (pandas, pyarrow, DuckDB, Spark and Ray read it as it is):
the row columns, `row_id`, and `vector` as fixed_size_list<float32>, with the encoder fingerprint
in the schema metadata. Row ids grow with each write, so within a shard and across the shards of
an index they are sorted; a row is found by its id from the shards' id ranges and the row group it
falls in, without reading the rest of the store.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.atomic import atomic_path
from indexer.errors import RetrieveError
from indexer.store import VECTOR_COLUMN, VectorSet, rows_to_table, vectors_from_table

ROW_ID = "row_id"
ROW_GROUP = 4096


def write_shard(path: Path, vs: VectorSet, row_ids: np.ndarray) -> dict[str, Any]:
    """Write one shard atomically; returns its description for the manifest (name, rows, id range)."""
    if ROW_ID in vs.rows.columns:
        raise RetrieveError(f"{path}: rows must not carry their own '{ROW_ID}' column (it is assigned here)")
    table = rows_to_table(vs)
    table = table.add_column(0, ROW_ID, pa.array(np.asarray(row_ids, dtype=np.int64)))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    return {
        "name": path.name,
        "rows": len(vs),
        "id_min": int(row_ids[0]) if len(row_ids) else 0,
        "id_max": int(row_ids[-1]) if len(row_ids) else -1,
    }


@dataclass
class Shard:
    path: Path
    rows: int
    id_min: int
    id_max: int
    legacy: bool = False  # a format 1 vectors.parquet: no row_id column, ids are positions


class ShardReader:
    """Reads an index's shards lazily: ids, some columns, some rows, or everything."""

    def __init__(self, shards: Sequence[Shard]):
        self.shards = list(shards)
        self._ids: dict[int, np.ndarray] = {}
        self._files: dict[int, pq.ParquetFile] = {}
        self._mins = [s.id_min for s in self.shards]
        for s in range(len(self.shards)):  # open now: a version removed later by a writer stays readable
            self._file(s)

    def _file(self, s: int) -> pq.ParquetFile:
        if s not in self._files:
            path = self.shards[s].path
            try:
                # pre_buffer off: a pre-buffering ParquetFile keeps the bytes of its last read while it is
                # open, and a reader keeps every shard open, so walking all shards held the whole store
                self._files[s] = pq.ParquetFile(pa.OSFile(str(path)), pre_buffer=False)
            except (pa.ArrowInvalid, OSError) as exc:
                msg = " ".join(str(exc).split())[:120]
                raise RetrieveError(f"{path}: not a readable Parquet shard ({msg})") from None
        return self._files[s]

    def shard_ids(self, s: int) -> np.ndarray:
        if s not in self._ids:
            shard = self.shards[s]
            if shard.legacy:
                self._ids[s] = np.arange(shard.rows, dtype=np.int64)
            elif shard.id_max - shard.id_min + 1 == shard.rows:  # contiguous: no need to read them
                self._ids[s] = np.arange(shard.id_min, shard.id_max + 1, dtype=np.int64)
            else:
                col = self._file(s).read(columns=[ROW_ID]).column(ROW_ID)
                self._ids[s] = col.to_numpy().astype(np.int64, copy=False)
        return self._ids[s]

    def all_ids(self) -> np.ndarray:
        parts = [self.shard_ids(s) for s in range(len(self.shards))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def row_columns(self, s: int) -> list[str]:
        return [c for c in self._file(s).schema_arrow.names if c not in (VECTOR_COLUMN, ROW_ID)]

    def read(self, columns: list[str] | None = None, vectors: bool = False) -> tuple[pd.DataFrame, np.ndarray | None]:
        """All rows of all shards (some columns, or every row column), optionally with the vectors."""
        parts = [self.read_shard(s, columns, vectors) for s in range(len(self.shards))]
        rows = pd.concat([p[0] for p in parts], ignore_index=True) if parts else pd.DataFrame()
        for c in columns or []:
            if c not in rows.columns:
                rows[c] = None
        vecs = [v for _, v in parts if v is not None]
        return rows, (np.vstack(vecs) if vectors and vecs else None)

    def read_shard(
        self, s: int, columns: list[str] | None = None, vectors: bool = False
    ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Every row of one shard (some columns, or every row column), optionally with its vectors."""
        have = self.row_columns(s)
        names = have if columns is None else [c for c in columns if c in have]
        table = self._file(s).read(columns=names + ([VECTOR_COLUMN] if vectors else []))
        vecs = None
        if vectors:
            vecs = vectors_from_table(table, self.shards[s].path)
            table = table.drop_columns([VECTOR_COLUMN])
        return _to_pandas(table), vecs

    def locate(self, row_id: int) -> tuple[int, int]:
        """(shard, row in shard) of a row id; KeyError if no shard holds it."""
        s = bisect.bisect_right(self._mins, row_id) - 1
        if s < 0 or row_id > self.shards[s].id_max:
            raise KeyError(row_id)
        shard = self.shards[s]
        if shard.id_max - shard.id_min + 1 == shard.rows:  # contiguous ids (every shard not compacted)
            return s, row_id - shard.id_min
        ids = self.shard_ids(s)
        r = int(np.searchsorted(ids, row_id))
        if r >= len(ids) or ids[r] != row_id:
            raise KeyError(row_id)
        return s, r

    def fetch(self, row_ids: Sequence[int], vectors: bool = False) -> tuple[pd.DataFrame, np.ndarray | None]:
        """The rows of the given ids, in that order, reading only the row groups that hold them."""
        where = [self.locate(int(i)) for i in row_ids]
        groups: dict[tuple[int, int], list[int]] = {}
        for s, r in where:
            groups.setdefault((s, r // ROW_GROUP if not self.shards[s].legacy else 0), []).append(r)
        got: dict[tuple[int, int], tuple[dict[str, Any], np.ndarray | None]] = {}
        for (s, g), rows_in_shard in groups.items():
            f = self._file(s)
            names = self.row_columns(s) + ([VECTOR_COLUMN] if vectors else [])
            if self.shards[s].legacy:
                table, offset = f.read(columns=names), 0
            else:
                table = f.read_row_group(g, columns=names)
                offset = sum(f.metadata.row_group(j).num_rows for j in range(g))
            picked = table.take(pa.array([r - offset for r in rows_in_shard]))
            vec = None
            if vectors:
                vec = vectors_from_table(picked, self.shards[s].path)
                picked = picked.drop_columns([VECTOR_COLUMN])
            frame = _to_pandas(picked)
            for j, r in enumerate(rows_in_shard):
                got[(s, r)] = (frame.iloc[j].to_dict(), None if vec is None else vec[j])
        records = [got[key][0] for key in where]
        out = pd.DataFrame.from_records(records) if records else pd.DataFrame()
        if "frame_index" in out.columns:
            out["frame_index"] = out["frame_index"].astype("Int64")
        vecs = np.vstack([v for key in where if (v := got[key][1]) is not None]) if vectors and where else None
        return out, vecs


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    if "frame_index" in df.columns:
        df["frame_index"] = df["frame_index"].astype("Int64")
    return df
