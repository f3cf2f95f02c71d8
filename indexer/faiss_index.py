"""FAISS index kinds over cosine similarity (inner product on L2-normalised vectors).

Kinds: flat (exact), hnsw (graph), ivf (inverted lists), ivfpq (inverted lists + product
quantisation). `auto` rule: exact `flat` below 100,000 vectors, `hnsw` below 1,000,000, `ivfpq` above.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.atomic import atomic_path
from indexer.config import IndexConfig
from indexer.errors import RetrieveError

log = logging.getLogger(__name__)

FLAT_MAX = 100_000
HNSW_MAX = 1_000_000
IndexBuilder = Callable[[int, int, IndexConfig], tuple[faiss.Index, dict[str, Any]]]
INDEX_KINDS: dict[str, IndexBuilder] = {}


def register_index(name: str) -> Callable[[IndexBuilder], IndexBuilder]:
    def deco(fn: IndexBuilder) -> IndexBuilder:
        INDEX_KINDS[name] = fn
        return fn

    return deco


def choose_kind(n: int) -> str:
    """The `auto` rule (documented in the README)."""
    if n < FLAT_MAX:
        return "flat"
    if n < HNSW_MAX:
        return "hnsw"
    return "ivfpq"


def _nlist(n: int, cfg: IndexConfig) -> int:
    if cfg.ivf_nlist:
        return max(1, min(cfg.ivf_nlist, n))
    return max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))


@register_index("flat")
def _flat(dim: int, n: int, cfg: IndexConfig):
    return faiss.IndexFlatIP(dim), {}


@register_index("hnsw")
def _hnsw(dim: int, n: int, cfg: IndexConfig):
    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = cfg.hnsw_ef_search
    return index, {"hnsw_m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search}


@register_index("ivf")
def _ivf(dim: int, n: int, cfg: IndexConfig):
    nlist = _nlist(n, cfg)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    return index, {"nlist": nlist, "nprobe": index.nprobe}


@register_index("ivfpq")
def _ivfpq(dim: int, n: int, cfg: IndexConfig):
    nlist = _nlist(n, cfg)
    m = cfg.pq_m or max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and d <= max(1, dim // 8))
    if dim % m:
        raise RetrieveError(f"pq_m {m} must divide the vector dimension {dim}")
    nbits = int(min(8, max(1, math.floor(math.log2(max(2, n // 4))))))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(cfg.ivf_nprobe, nlist)
    return index, {"nlist": nlist, "nprobe": index.nprobe, "pq_m": m, "pq_nbits": nbits}


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


_GPU_RESOURCES = None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move to GPU 0 where FAISS was built with CUDA; HNSW has no GPU version and stays on the CPU."""
    global _GPU_RESOURCES
    if isinstance(index, faiss.IndexHNSW):
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    return (
        faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__ else index
    )


def new_index(dim: int, n: int, kind: str, cfg: IndexConfig, use_gpu: bool) -> tuple[faiss.Index, str, dict[str, Any]]:
    """An empty index of the kind (`auto` resolved for n vectors), keyed by 64-bit ids; (index, kind, params).

    IVF kinds hold ids natively; the others are wrapped in `IndexIDMap2`, so results are ids that
    survive deletes.
    """
    resolved = choose_kind(n) if kind == "auto" else kind
    if resolved not in INDEX_KINDS:
        raise RetrieveError(f"--kind {kind}: unknown; choose auto, {', '.join(INDEX_KINDS)}")
    index, params = INDEX_KINDS[resolved](dim, n, cfg)
    if not isinstance(index, faiss.IndexIVF):
        index = faiss.IndexIDMap2(index)
    on_gpu = use_gpu and gpu_count() > 0 and resolved != "hnsw"
    if on_gpu:
        index = to_gpu(index)
    params["built_on"] = "gpu" if on_gpu else "cpu"
    params["removal"] = "tombstone" if resolved == "hnsw" else "faiss"
    return index, resolved, params


def fill_index(
    index: faiss.Index,
    batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    sample: Callable[[], np.ndarray] | None = None,
) -> None:
    """Train on `sample()` when the kind needs it, then add (vectors, ids) batch by batch."""
    if not index.is_trained:
        if sample is None:
            raise ValueError("this index kind needs training vectors")
        index.train(np.ascontiguousarray(sample(), dtype=np.float32))
    for vectors, ids in batches():
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def build_index(
    vectors: np.ndarray, kind: str, cfg: IndexConfig, use_gpu: bool, ids: np.ndarray | None = None
) -> tuple[faiss.Index, str, dict[str, Any]]:
    """Train (when the kind needs it) and fill an index; returns (index, resolved kind, parameters)."""
    n, dim = vectors.shape
    index, resolved, params = new_index(dim, n, kind, cfg, use_gpu)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    keys = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    fill_index(index, lambda: [(x, keys)], sample=lambda: x)
    return index, resolved, params


def inner(index: faiss.Index) -> faiss.Index:
    """The index inside an id map (the kind's own index)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def has_ids(index: faiss.Index) -> bool:
    """Whether search results are stable ids (format 2) rather than row positions (format 1)."""
    return isinstance(index, (faiss.IndexIDMap, faiss.IndexIVF))


def search_parameters(index: faiss.Index, k: int, params: dict[str, Any], selector: Any = None) -> Any:
    """SearchParameters for the kind: search depth at least k, and an IDSelector restricting candidates."""
    core = inner(index)
    if isinstance(core, faiss.IndexHNSW):
        sp = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # in faiss, not in its stubs
        sp.efSearch = max(int(params.get("ef_search", 128)), k)
    elif isinstance(core, faiss.IndexIVF):
        sp = faiss.SearchParametersIVF()
        sp.nprobe = int(params.get("nprobe", core.nprobe))
    else:
        sp = faiss.SearchParameters()
    if selector is not None:
        sp.sel = selector
    return sp


def save_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(to_cpu(index), str(tmp))


def load_index(path: Path, use_gpu: bool, mmap: bool = False) -> faiss.Index:
    """Read an index file; with `mmap` (readers on the CPU) the vectors stay in the file, memory-mapped,
    so opening costs no time or memory whatever the size (a writer needs `mmap=False` to change it)."""
    if not path.is_file():
        raise RetrieveError(f"{path}: FAISS index file not found")
    on_gpu = use_gpu and gpu_count() > 0
    flags = faiss.IO_FLAG_MMAP_IFC if mmap and not on_gpu else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise RetrieveError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from None
    if on_gpu:
        try:
            index = to_gpu(index)
        except RuntimeError as exc:  # e.g. an index type without GPU support
            log.info("searching on CPU, the GPU refused this index (%s)", exc)
    return index
