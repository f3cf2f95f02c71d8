"""`retrieve index tune`: the cheapest search setting that reaches a recall, stored in the manifest.

A held-out sample of the index's own live vectors serves as queries (each query's own row is left out
of both the truth and the results). The truth is exact inner product over every live row, computed
shard by shard (memory bounded by one shard). The index's search settings (nprobe, efSearch, and for
factory strings every knob `faiss.ParameterSpace` knows, e.g. quantizer_efSearch, but not the polysemous
threshold ht) are swept from
cheap to dear; settings dominated by one that already reaches the recall are skipped. The cheapest
setting (lowest measured ms/query) that reaches the recall is written into the manifest's params in one
atomic write under the write lock; queries apply it when they open the index. Where no setting reaches
the recall, the most accurate one is stored and the result says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.atomic import atomic_path
from indexer.errors import RetrieveError
from indexer.faiss_index import inner, search_parameters
from indexer.index_dir import MANIFEST, IndexDir, _now, open_index_dir, read_manifest, write_lock

log = logging.getLogger(__name__)

MAX_SETTINGS = 64  # settings measured at most (the sweep is ordered cheap to dear)
CHUNK = 20_000  # rows of a shard multiplied at once for the exact truth


@dataclass
class Setting:
    name: str  # ParameterSpace syntax, e.g. "nprobe=16" or "nprobe=8,quantizer_efSearch=64"; "" for exact
    recall: float
    ms_per_query: float


@dataclass
class TuneResult:
    target: float
    k: int
    queries: int
    chosen: Setting
    reached: bool
    exact_ms_per_query: float
    tried: list[Setting] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample_ids(idx: IndexDir, sample: int, seed: int) -> np.ndarray:
    live = idx.live_ids
    if len(live) < 2:
        raise RetrieveError(f"--index {idx.path}: {len(live)} images; tuning needs at least 2")
    n = min(sample, len(live) - 1)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(live, size=n, replace=False))


def exact_truth(idx: IndexDir, queries: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Row ids of the k nearest live rows of each query (its own row left out), shard by shard; and ms/query."""
    removed = set(idx.removed.tolist())
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(len(idx.reader.shards)):
        _, vecs = idx.reader.read_shard(s, columns=[], vectors=True)
        assert vecs is not None
        ids = idx.reader.shard_ids(s)
        if removed:
            keep = ~np.isin(ids, list(removed))
            vecs, ids = vecs[keep], ids[keep]
        for start in range(0, len(ids), CHUNK):
            v, i = vecs[start : start + CHUNK], ids[start : start + CHUNK]
            sims = queries @ v.T
            sims[query_ids[:, None] == i[None, :]] = -np.inf  # held out: a query is not its own neighbour
            cand_s = np.concatenate([best_s, sims], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(i, sims.shape)], axis=1)
            top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k] if cand_s.shape[1] > k else None
            if top is not None:
                best_s = np.take_along_axis(cand_s, top, axis=1)
                best_i = np.take_along_axis(cand_i, top, axis=1)
            else:
                best_s, best_i = cand_s, cand_i
    ms = 1000 * (time.perf_counter() - t0) / len(queries)
    return best_i, ms


def _selector(idx: IndexDir) -> Any:
    if idx.manifest.params.get("removal") == "tombstone" and len(idx.removed):
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(idx.removed))
    return None


def measure(idx: IndexDir, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, k: int) -> Setting:
    """Recall@k and ms/query of the index with its current settings (held out: own row dropped)."""
    sp = search_parameters(idx.index, k + 1, {}, _selector(idx))
    search_fn = getattr(idx.index, "search_numpy", idx.index.search)
    t0 = time.perf_counter()
    _, found = search_fn(queries, k + 1, params=sp)
    ms = 1000 * (time.perf_counter() - t0) / len(queries)
    hits = 0
    for q in range(len(queries)):
        got = [int(i) for i in found[q] if i >= 0 and i != query_ids[q]][:k]
        hits += len(set(got) & set(truth[q].tolist()))
    return Setting("", hits / (k * len(queries)), ms)


SKIPPED_KNOBS = ("ht",)  # the polysemous Hamming threshold: its low values filter out almost every true neighbour


def parameter_space(index: Any) -> Any:
    """faiss.ParameterSpace of the index (through an id map), without the polysemous threshold `ht`."""
    space: Any = faiss.ParameterSpace()
    space.initialize(inner(index))  # initialize does not look inside an id map (set_index_parameters does)
    ranges = []
    for i in range(space.parameter_ranges.size()):
        pr = space.parameter_ranges.at(i)  # a copy: read its values while it lives
        ranges.append((pr.name, faiss.vector_to_array(pr.values).copy()))
    space.parameter_ranges.clear()
    for name, values in ranges:
        if name in SKIPPED_KNOBS:
            continue
        pr = faiss.ParameterRange()
        pr.name = name
        faiss.copy_array_to_vector(np.asarray(values, dtype=np.float64), pr.values)
        space.parameter_ranges.push_back(pr)
    return space


def sweep(idx: IndexDir, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, k: int, target: float):
    """Every ParameterSpace setting from cheap to dear, skipping those dominated by one reaching the target."""
    space = parameter_space(idx.index)
    n = space.n_combinations()
    tried: list[Setting] = []
    reaching: list[int] = []
    for c in range(n):
        if len(tried) >= MAX_SETTINGS:
            log.info("tune: stopped after %d settings", MAX_SETTINGS)
            break
        if any(space.combination_ge(c, r) for r in reaching):
            continue  # at least as deep as a setting that already reaches the recall: only dearer
        name = space.combination_name(c)
        space.set_index_parameters(idx.index, name)
        s = measure(idx, queries, query_ids, truth, k)
        s.name = name
        tried.append(s)
        log.info("tune: %s recall@%d %.4f, %.3f ms/query", name or "(no parameters)", k, s.recall, s.ms_per_query)
        if s.recall >= target:
            reaching.append(c)
    return tried


def _params_of(name: str) -> dict[str, Any]:
    """Manifest keys for a setting: the ParameterSpace string, and nprobe / ef_search where named."""
    out: dict[str, Any] = {"search_params": name}
    for part in filter(None, name.split(",")):
        key, _, value = part.partition("=")
        if key == "nprobe":
            out["nprobe"] = int(float(value))
        elif key == "efSearch":
            out["ef_search"] = int(float(value))
    return out


def tune_index_dir(
    index_dir: str | Path, recall: float = 0.95, sample: int = 1000, k: int = 10, seed: int = 0
) -> TuneResult:
    """Sweep the index's search settings on a held-out sample, store the cheapest reaching `recall`."""
    index_dir = Path(index_dir)
    if not 0 < recall <= 1:
        raise RetrieveError(f"--recall {recall}: must be in (0, 1]")
    if sample < 1:
        raise RetrieveError(f"--sample {sample}: must be at least 1")
    if k < 1:
        raise RetrieveError(f"--k {k}: must be at least 1")
    before = read_manifest(index_dir)
    idx = open_index_dir(index_dir, use_gpu=False)
    if k >= idx.count:
        raise RetrieveError(f"--k {k}: the index holds only {idx.count} images")
    query_ids = _sample_ids(idx, sample, seed)
    _, queries = idx.reader.fetch(query_ids.tolist(), vectors=True)
    assert queries is not None
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    truth, exact_ms = exact_truth(idx, queries, query_ids, k)
    tried = sweep(idx, queries, query_ids, truth, k, recall)
    if not tried:
        raise RetrieveError(f"--index {index_dir}: nothing to tune")
    reaching = [s for s in tried if s.recall >= recall]
    chosen = min(reaching, key=lambda s: s.ms_per_query) if reaching else max(tried, key=lambda s: s.recall)
    result = TuneResult(recall, k, len(queries), chosen, bool(reaching), exact_ms, tried)
    with write_lock(index_dir):
        m = read_manifest(index_dir)
        if (m.generation, m.index_file, m.removed) != (before.generation, before.index_file, before.removed):
            raise RetrieveError(f"--index {index_dir}: changed while being tuned; nothing stored, tune it again")
        m.params = {k_: v for k_, v in m.params.items() if k_ not in ("search_params", "tuned")}
        m.params.update(_params_of(chosen.name))
        m.params["tuned"] = {
            "recall_target": recall,
            "recall": round(chosen.recall, 4),
            "ms_per_query": round(chosen.ms_per_query, 4),
            "k": k,
            "queries": len(queries),
            "reached": bool(reaching),
            "at": _now(),
        }
        m.updated = _now()
        with atomic_path(index_dir / MANIFEST) as tmp:
            tmp.write_text(m.to_json(), encoding="utf-8")
    return result
