"""A 2-D map of an index's vectors (PCA 50 -> t-SNE), computed once and cached in the index folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.atomic import atomic_path
from indexer.index_dir import IndexDir

MAP_FILE = "map2d.parquet"
MAP_KEY = b"retrieve.map2d"
MAX_POINTS = 5000


def _stamp(idx: IndexDir) -> dict:
    """What the cached map must agree with: row count, last update and the encoder's weights."""
    return {
        "count": idx.manifest.count,
        "updated": idx.manifest.updated,
        "weights": idx.manifest.fingerprint.get("weights_sha256"),
    }


def load_or_compute_map(idx: IndexDir, seed: int = 0) -> pd.DataFrame:
    """Columns position, id, x, y; a seeded sample of MAX_POINTS rows for larger collections."""
    from retrieval.evaluation.report import embedding_2d

    path = Path(idx.path) / MAP_FILE
    stamp = _stamp(idx)
    if path.is_file():
        try:
            table = pq.read_table(path)
            if json.loads((table.schema.metadata or {}).get(MAP_KEY, b"{}")) == stamp:
                return table.to_pandas()
        except (pa.ArrowInvalid, OSError, json.JSONDecodeError):
            pass  # damaged or stale cache: recompute
    n = len(idx.rows)
    positions = (
        np.arange(n) if n <= MAX_POINTS else np.sort(np.random.default_rng(seed).choice(n, MAX_POINTS, replace=False))
    )
    xy = embedding_2d(idx.vectors.vectors[positions], seed) if len(positions) >= 3 else np.zeros((len(positions), 2))
    frame = pd.DataFrame(
        {"position": positions, "id": idx.rows["id"].to_numpy()[positions], "x": xy[:, 0], "y": xy[:, 1]}
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), MAP_KEY: json.dumps(stamp).encode()})
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except OSError:
        pass  # a read-only index folder still gets a map, just not a cached one
    return frame
