"""How a FAISS index is built (a section of the YAML recipes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IndexConfig:
    """How the FAISS index is built."""

    kind: str = "auto"
    gpu: bool = True
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None  # None: 4 * sqrt(N), bounded so each list gets >= 39 training points
    ivf_nprobe: int = 16
    pq_m: int | None = None  # None: a divisor of the dimension near dim / 16
    on_disk: bool = False  # IVF lists in a memory-mapped lists file of their own (indexer/ondisk.py)
