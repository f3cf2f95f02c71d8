"""Index kinds: named shorthands for `faiss.index_factory` strings, and any factory string itself.

A named kind turns the number of vectors and the recipe (`IndexConfig`) into a factory string and the
parameters it was chosen with:

    flat   -> "Flat"                      exact inner product
    hnsw   -> "HNSW{M}"                   graph; efSearch from the recipe
    ivf    -> "IVF{nlist},Flat"           inverted lists; nlist ~ 4 sqrt(N), nprobe from the recipe
    ivfsq  -> "IVF{nlist},SQ8"            inverted lists + 8-bit scalar quantisation (1 byte a dimension)
    ivfpq  -> "IVF{nlist},PQ{m}x{nbits}np"  inverted lists + product quantisation

Any other `--kind` is taken as a factory string as it is ("OPQ64,IVF4096,PQ64", "PCA256,HNSW32"),
built with the inner-product metric (cosine on L2-normalised vectors). `auto`: exact `flat` below
100,000 vectors, `hnsw` below 1,000,000, `ivfsq` above (1 byte a dimension; IVF-PQ's recall was 0.22-0.66
in docs/benchmarks/scale.md, so it is offered by name only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from indexer.config import IndexConfig

FLAT_MAX = 100_000
HNSW_MAX = 1_000_000

KindSpec = Callable[[int, int, IndexConfig], tuple[str, dict[str, Any]]]
KINDS: dict[str, KindSpec] = {}


def register_kind(name: str) -> Callable[[KindSpec], KindSpec]:
    """Register a named kind: fn(dim, n, cfg) -> (factory string, parameters for the manifest)."""

    def deco(fn: KindSpec) -> KindSpec:
        KINDS[name] = fn
        return fn

    return deco


def choose_kind(n: int) -> str:
    """The `auto` rule (documented in the README)."""
    if n < FLAT_MAX:
        return "flat"
    if n < HNSW_MAX:
        return "hnsw"
    return "ivfsq"  # not ivfpq: its codes lose the neighbours (recall 0.22-0.66, docs/benchmarks/scale.md)


def nlist_for(n: int, cfg: IndexConfig) -> int:
    if cfg.ivf_nlist:
        return max(1, min(cfg.ivf_nlist, n))
    return max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))


@register_kind("flat")
def _flat(dim: int, n: int, cfg: IndexConfig) -> tuple[str, dict[str, Any]]:
    return "Flat", {}


@register_kind("hnsw")
def _hnsw(dim: int, n: int, cfg: IndexConfig) -> tuple[str, dict[str, Any]]:
    return f"HNSW{cfg.hnsw_m}", {"hnsw_m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search}


@register_kind("ivf")
def _ivf(dim: int, n: int, cfg: IndexConfig) -> tuple[str, dict[str, Any]]:
    nlist = nlist_for(n, cfg)
    return f"IVF{nlist},Flat", {"nlist": nlist, "nprobe": min(cfg.ivf_nprobe, nlist)}


@register_kind("ivfsq")
def _ivfsq(dim: int, n: int, cfg: IndexConfig) -> tuple[str, dict[str, Any]]:
    nlist = nlist_for(n, cfg)
    return f"IVF{nlist},SQ8", {"nlist": nlist, "nprobe": min(cfg.ivf_nprobe, nlist)}


def pq_m_for(dim: int, cfg: IndexConfig) -> int:
    return cfg.pq_m or max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and d <= max(1, dim // 8))


@register_kind("ivfpq")
def _ivfpq(dim: int, n: int, cfg: IndexConfig) -> tuple[str, dict[str, Any]]:
    from indexer.errors import RetrieveError

    nlist = nlist_for(n, cfg)
    m = pq_m_for(dim, cfg)
    if dim % m:
        raise RetrieveError(f"pq_m {m} must divide the vector dimension {dim}")
    nbits = int(min(8, max(1, math.floor(math.log2(max(2, n // 4))))))
    params = {"nlist": nlist, "nprobe": min(cfg.ivf_nprobe, nlist), "pq_m": m, "pq_nbits": nbits}
    return f"IVF{nlist},PQ{m}x{nbits}np", params  # np: no polysemous training (slow, unused)


REFINE = re.compile(r"(^|,)\s*(RFlat|Refine\()", re.IGNORECASE)


def is_named(kind: str) -> bool:
    return kind == "auto" or kind in KINDS


def resolve(kind: str, dim: int, n: int, cfg: IndexConfig) -> tuple[str, str, dict[str, Any]]:
    """(resolved kind, factory string, parameters): `auto` chosen for n vectors, a named kind expanded,
    a factory string kept as it is."""
    name = choose_kind(n) if kind == "auto" else kind
    if name in KINDS:
        factory, params = KINDS[name](dim, n, cfg)
        return name, factory, params
    return kind, kind.strip(), {}
