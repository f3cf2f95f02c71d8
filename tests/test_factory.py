"""Any faiss.index_factory string as --kind: stable ids, filters, removal, compact; rejected strings change nothing."""

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from indexer.config import IndexConfig
from indexer.errors import RetrieveError
from indexer.faiss_index import INDEX_KINDS, build_index, check_kind, faiss_install_problem, search_device
from indexer.index_dir import build_index_dir, compact_index_dir, open_index_dir, remove_from_index_dir
from indexer.search import search
from indexer.store import VectorSet

DIM = 32
FP = {"encoder": "toy", "arch": {"type": "toy"}, "weights_sha256": "abc", "dim": DIM, "preprocess": {}}


def clustered(n, dim=DIM, centres=20, seed=0, rank=12):
    """Clusters in a rank-12 subspace (so a PCA16 stage loses nothing), L2-normalised."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, rank))
    z = c[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, rank))
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, rank)))[0]
    v = z @ basis.T
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)


def recall_at(idx, vs, queries, k, allowed=None):
    """Recall@k of the index's ids against exact inner product over the same rows (an independent check)."""
    sims = vs.vectors[queries] @ vs.vectors.T
    if allowed is not None:
        sims[:, ~allowed] = -np.inf
    truth = np.argsort(-sims, axis=1)[:, :k]
    hits = search(idx, vs.vectors[queries], k=k, allowed=allowed)
    return np.mean([len(set(t) & {h.row_id for h in hq}) / k for t, hq in zip(truth, hits)])


def _vs(n=3000, seed=0):
    rows = pd.DataFrame(
        {
            "id": [f"img{j}.png" for j in range(n)],
            "path": [f"/data/img{j}.png" for j in range(n)],
            "label": [["a", "b", "c"][j % 3] for j in range(n)],
            "patient_id": [f"p{j // 10}" for j in range(n)],
            "frame_index": pd.array([None] * n, dtype="Int64"),
        }
    )
    return VectorSet(rows, clustered(n, seed=seed), FP, {"name": "toy", "weights": None, "seed": 0})


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


FACTORIES = ["PCA16,HNSW16", "HNSW16,SQ8", "IVF32,SQ8", "OPQ8,IVF32,PQ8x4np", "IVF16_HNSW8,Flat", "SQ8"]


@pytest.mark.slow
@pytest.mark.parametrize("factory", FACTORIES)
def test_factory_string_builds_searches_filters_removes(tmp_path, factory):
    vs = _vs()
    m = build_index_dir(tmp_path / "ix", vs, IndexConfig(kind=factory, gpu=False))
    assert m.kind == factory and m.params["factory"] == factory
    idx = open_index_dir(tmp_path / "ix", use_gpu=False)
    assert search_device(idx.index) == "cpu"
    # results are row ids: they agree with exact search over the rows (chance would give ~0.003)
    assert recall_at(idx, vs, np.arange(0, 3000, 60), 10) >= 0.5
    # a filter is applied inside the search and k results come back
    allowed = (vs.rows["label"] == "b").to_numpy()
    for h in search(idx, vs.vectors[:20], k=10, allowed=allowed):
        assert len(h) == 10
        assert all(allowed[x.position] for x in h)
    # removal: never returned afterwards, whatever the index can do itself
    gone = np.arange(0, 3000, 3)
    remove_from_index_dir(tmp_path / "ix", lambda ix: np.isin(ix.live_ids, gone))
    idx = open_index_dir(tmp_path / "ix", use_gpu=False)
    assert idx.count == 2000
    for h in search(idx, vs.vectors[:30], k=10):
        assert len(h) == 10 and not set(x.row_id for x in h) & set(gone.tolist())
    m2, dropped = compact_index_dir(tmp_path / "ix")
    assert dropped == 1000 and m2.kind == factory and m2.removed == []
    idx = open_index_dir(tmp_path / "ix", use_gpu=False)
    assert idx.index.ntotal == 2000


@pytest.mark.slow
def test_named_kinds_are_factory_shorthands():
    x = clustered(3000)
    expect = {"flat": ("Flat", faiss.IndexFlat), "hnsw": ("HNSW32", faiss.IndexHNSWFlat)}
    for kind, (factory, cls) in expect.items():
        index, resolved, params = build_index(x, kind, IndexConfig(), use_gpu=False)
        assert resolved == kind and params["factory"] == factory
        assert isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), cls)
    index, _, params = build_index(x, "ivf", IndexConfig(ivf_nlist=16, ivf_nprobe=4), use_gpu=False)
    assert params["factory"] == "IVF16,Flat" and isinstance(index, faiss.IndexIVFFlat) and index.nprobe == 4
    index, _, params = build_index(x, "ivfpq", IndexConfig(ivf_nlist=16, pq_m=8), use_gpu=False)
    assert params["factory"] == f"IVF16,PQ8x{params['pq_nbits']}np" and isinstance(index, faiss.IndexIVFPQ)
    index, _, params = build_index(x, "ivfsq", IndexConfig(ivf_nlist=16), use_gpu=False)
    assert params["factory"] == "IVF16,SQ8" and isinstance(index, faiss.IndexIVFScalarQuantizer)
    assert set(INDEX_KINDS) >= {"flat", "hnsw", "ivf", "ivfsq", "ivfpq"}


@pytest.mark.parametrize(
    "bad, says",
    [
        ("Bogus12", "FAISS rejects it"),
        ("PQ7", "FAISS rejects it"),  # 7 does not divide 32
        ("LSH", "FAISS rejects it"),  # L2 only
        ("IVF16,Flat,RFlat", "refinement"),
        ("  ", "empty"),
    ],
)
def test_rejected_factory_string_is_one_line_and_changes_nothing(tmp_path, bad, says):
    with pytest.raises(RetrieveError, match=says) as err:
        check_kind(bad, DIM)
    assert "\n" not in str(err.value) and "--kind" in str(err.value)
    vs = _vs(500)
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="flat", gpu=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ix").iterdir() if p.is_file()}
    with pytest.raises(RetrieveError, match=says):
        build_index_dir(tmp_path / "ix", vs, IndexConfig(kind=bad, gpu=False), overwrite=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "ix").iterdir() if p.is_file()}
    assert after == before


def test_untrainable_factory_string_changes_nothing(tmp_path):
    vs = _vs(500)
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="flat", gpu=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ix").iterdir() if p.is_file()}
    with pytest.raises(RetrieveError, match="could not train"):  # 4096 lists from 500 vectors
        build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="IVF4096,Flat", gpu=False), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ix").iterdir() if p.is_file()} == before


def test_gpu_requested_without_gpu_searches_on_cpu(tmp_path):
    """The CPU fallback of the GPU path (this machine has no GPU): index info and queries say "cpu"."""
    vs = _vs(2000)
    m = build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="IVF16,Flat", gpu=True))
    assert m.params["built_on"] == "cpu"
    idx = open_index_dir(tmp_path / "ix", use_gpu=True)
    assert idx.search_device == "cpu"
    search(idx, vs.vectors[:3], k=5)
    assert idx.search_device == "cpu"


def test_faiss_cpu_beside_a_gpu_build_is_reported():
    assert "share one `faiss` module" in faiss_install_problem(["faiss-cpu", "faiss-gpu"])
    assert faiss_install_problem(["faiss-gpu"]) is None and faiss_install_problem(["faiss-cpu"]) is None


def test_planned_search_device(monkeypatch):
    """Which indexes go to the GPUs (logic only: this machine has none, so everything says cpu here)."""
    import indexer.faiss_index as fi

    assert fi.planned_search_device({"factory": "IVF16,Flat"}, DIM) == "cpu"
    monkeypatch.setattr(fi, "gpu_count", lambda: 2)
    assert fi.planned_search_device({"factory": "IVF16,Flat"}, DIM) == "gpu:0,1"
    assert fi.planned_search_device({"factory": "Flat"}, DIM) == "gpu:0,1"
    assert fi.planned_search_device({"factory": "HNSW32"}, DIM) == "cpu"  # no GPU HNSW
    assert fi.planned_search_device({"factory": "PCA16,IVF16,Flat"}, DIM) == "cpu"
    assert fi.planned_search_device({"factory": "IVF16,Flat"}, DIM, use_gpu=False) == "cpu"
    assert fi.planned_search_device({}, DIM) == "cpu"  # an index from before factory strings


@pytest.mark.slow
def test_query_json_says_where_it_searched(capsys, demo_data, demo_index):
    from conftest import run_cli

    img = sorted((demo_data / "normal").iterdir())[0]
    code, out, err = run_cli(capsys, "query", img, "--index", demo_index, "--k", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["search_device"] == "cpu"  # no GPU here (the GPU path is untested)


def test_gpu_plumbing_with_a_simulated_gpu(tmp_path, monkeypatch):
    """The GPU code path's bookkeeping, with faiss's GPU cloner replaced by a CPU copy (no GPU here): IVF
    k-means goes through the cloned quantizer, a streaming-style fill_index (no use_gpu) follows new_index's
    choice, and a loaded "GPU" index keeps its CPU original for filtered searches."""
    import indexer.faiss_index as fi

    cloned = []

    def fake_all_gpus(index, *a, **k):
        cloned.append(type(faiss.downcast_index(index)).__name__)
        return faiss.clone_index(index)

    monkeypatch.setattr(fi, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fake_all_gpus)
    x = clustered(2000)
    index, _, params = fi.new_index(DIM, len(x), "IVF16,Flat", IndexConfig(), use_gpu=True)
    assert params["built_on"] == "gpu"
    fi.fill_index(index, lambda: [(x, np.arange(len(x)))], sample=lambda: x)  # as streaming.py calls it
    assert cloned == ["IndexFlatIP"]  # the k-means assignment index went to the "GPUs"
    assert faiss.extract_index_ivf(index).clustering_index is None and index.ntotal == 2000
    path = tmp_path / "i.faiss"
    fi.save_index(index, path)
    loaded = fi.load_index(path, use_gpu=True, mmap=True)
    assert cloned[-1] == "IndexIVFFlat" and fi.cpu_twin(loaded) is not loaded
    assert fi.cpu_twin(fi.cpu_twin(loaded)) is fi.cpu_twin(loaded)
    hnsw, _, params = fi.new_index(DIM, 100, "hnsw", IndexConfig(), use_gpu=True)
    assert params["built_on"] == "cpu"  # no GPU HNSW
