"""Parquet vector store: one row per image, the vector as fixed_size_list<float32>, the encoder
fingerprint and spec in the schema metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.atomic import atomic_path
from indexer.errors import RetrieveError
from indexer.fingerprint import fingerprint_difference

VECTOR_COLUMN = "vector"
FINGERPRINT_KEY = b"retrieve.fingerprint"
SPEC_KEY = b"retrieve.encoder_spec"


@dataclass
class VectorSet:
    """Rows (id, path, label, patient_id, frame_index, metadata...) with their vectors."""

    rows: pd.DataFrame
    vectors: np.ndarray
    fingerprint: dict[str, Any]
    encoder_spec: dict[str, Any]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.vectors):
            raise ValueError(f"{len(self.rows)} rows but {len(self.vectors)} vectors")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _rows_to_arrow(rows: pd.DataFrame) -> pa.Table:
    df = rows.reset_index(drop=True).copy()
    for col in df.columns:
        if df[col].dtype == object:
            try:
                pa.array(df[col], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return pa.Table.from_pandas(df, preserve_index=False)


def rows_to_table(vs: VectorSet) -> pa.Table:
    """Rows + the vector column + the encoder fingerprint and spec in the schema metadata."""
    bad = [c for c in vs.rows.columns if not isinstance(c, str) or c == VECTOR_COLUMN]
    if bad or vs.rows.columns.duplicated().any():
        raise RetrieveError(f"row columns must be unique names other than '{VECTOR_COLUMN}' ({bad})")
    vectors = np.ascontiguousarray(vs.vectors, dtype=np.float32)
    table = _rows_to_arrow(vs.rows)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    table = table.append_column(VECTOR_COLUMN, pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    meta = dict(table.schema.metadata or {})
    meta[FINGERPRINT_KEY] = json.dumps(vs.fingerprint).encode()
    meta[SPEC_KEY] = json.dumps(vs.encoder_spec).encode()
    return table.replace_schema_metadata(meta)


def vectors_from_table(table: pa.Table, path: str | Path) -> np.ndarray:
    """The vector column as a contiguous float32 (N, dim) array; one-line errors for a wrong type."""
    col = table.column(VECTOR_COLUMN).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or not pa.types.is_floating(col.type.value_type) or col.null_count:
        raise RetrieveError(f"{path}: column '{VECTOR_COLUMN}' must be fixed_size_list<float> without nulls")
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(-1, dim))


def write_vectors(path: str | Path, vs: VectorSet) -> Path:
    """Write atomically; an existing file at `path` is replaced only when the new one is complete."""
    path = Path(path)
    if path.is_dir():
        raise RetrieveError(f"{path}: is a folder; give the path of a .parquet file to write")
    try:
        table = rows_to_table(vs)
    except RetrieveError as exc:
        raise RetrieveError(f"{path}: {exc}") from None
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def vector_file_meta(schema: pa.Schema, path: str | Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(encoder fingerprint, encoder spec, dim) of a vectors file, from its Parquet schema alone: the vector
    column's type, the fingerprint in the metadata and the id/path columns are checked; one-line errors."""
    meta = schema.metadata or {}
    if VECTOR_COLUMN not in schema.names or FINGERPRINT_KEY not in meta:
        raise RetrieveError(f"{path}: not a vectors file written by `retrieve embed` (no vector column or fingerprint)")
    vtype = schema.field(VECTOR_COLUMN).type
    if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_floating(vtype.value_type):
        raise RetrieveError(f"{path}: column '{VECTOR_COLUMN}' must be fixed_size_list<float> without nulls")
    dim = vtype.list_size
    try:
        fingerprint = json.loads(meta[FINGERPRINT_KEY])
        spec = json.loads(meta.get(SPEC_KEY, b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RetrieveError(f"{path}: damaged encoder fingerprint in the Parquet metadata") from None
    if not isinstance(fingerprint, dict):
        raise RetrieveError(f"{path}: damaged encoder fingerprint in the Parquet metadata")
    if fingerprint.get("dim") not in (None, dim):
        raise RetrieveError(f"{path}: vectors are {dim}-d but their encoder fingerprint says {fingerprint['dim']}-d")
    missing = [c for c in ("id", "path") if c not in schema.names]
    if missing:
        raise RetrieveError(f"{path}: vectors file without the column(s) {', '.join(missing)}")
    return fingerprint, spec, dim


def read_vectors(path: str | Path) -> VectorSet:
    """A vectors file from `retrieve embed`, or a folder of shards from `retrieve embed --engine ray`."""
    path = Path(path)
    if path.is_dir():
        return read_vector_folder(path)
    if not path.is_file():
        raise RetrieveError(f"{path}: vectors file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RetrieveError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    fingerprint, encoder_spec, _ = vector_file_meta(table.schema, path)
    vectors = vectors_from_table(table, path)
    rows = table.drop_columns([VECTOR_COLUMN]).to_pandas()
    if "frame_index" in rows.columns:
        rows["frame_index"] = rows["frame_index"].astype("Int64")
    return VectorSet(
        rows=rows,
        vectors=np.ascontiguousarray(vectors),
        fingerprint=fingerprint,
        encoder_spec=encoder_spec,
    )


def read_vector_folder(folder: Path) -> VectorSet:
    """Every *.parquet shard of a folder, in name order, as one VectorSet; all from the same encoder."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise RetrieveError(f"{folder}: folder without vector shards (*.parquet)")
    parts = [read_vectors(f) for f in files]
    for f, vs in zip(files[1:], parts[1:]):
        diff = fingerprint_difference(parts[0].fingerprint, vs.fingerprint)
        if diff:
            raise RetrieveError(
                f"{folder}: shards from different encoders ({files[0].name} vs {f.name}: {diff}); "
                "embed them again with one encoder"
            )
    rows = pd.concat([vs.rows.drop(columns=["row_id"], errors="ignore") for vs in parts], ignore_index=True)
    return VectorSet(rows, np.vstack([vs.vectors for vs in parts]), parts[0].fingerprint, parts[0].encoder_spec)
