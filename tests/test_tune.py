"""`index tune`: the cheapest nprobe / efSearch / ParameterSpace setting reaching a recall, stored and used."""

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from indexer.config import IndexConfig
from indexer.errors import RetrieveError
from indexer.index_dir import add_to_index_dir, build_index_dir, open_index_dir, read_manifest, remove_from_index_dir
from indexer.search import search
from indexer.store import VectorSet
from indexer.tune import tune_index_dir

DIM = 32
FP = {"encoder": "toy", "arch": {"type": "toy"}, "weights_sha256": "abc", "dim": DIM, "preprocess": {}}


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def _vs(n=4000, seed=0, start=0):
    """Overlapping clusters: an IVF with few probes misses neighbours, so there is something to tune."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(30, DIM))
    v = centres[rng.integers(0, 30, n)] + 0.9 * rng.normal(size=(n, DIM))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    rows = pd.DataFrame(
        {
            "id": [f"img{start + j}.png" for j in range(n)],
            "path": [f"/data/img{start + j}.png" for j in range(n)],
            "frame_index": pd.array([None] * n, dtype="Int64"),
        }
    )
    return VectorSet(rows, v, FP, {"name": "toy", "weights": None, "seed": 0})


def independent_recall(vs, index_path, ids, setting, k=10):
    """Recall@k of the FAISS file with a setting against numpy exact search, each query's row held out."""
    index = faiss.read_index(str(index_path))
    if setting:
        faiss.ParameterSpace().set_index_parameters(index, setting)
    q = vs.vectors[ids]
    sims = q @ vs.vectors.T
    sims[np.arange(len(ids)), ids] = -np.inf
    truth = np.argsort(-sims, axis=1)[:, :k]
    _, found = index.search(q, k + 1)
    got = [[i for i in row if i != qi][:k] for row, qi in zip(found, ids)]
    return np.mean([len(set(t) & set(g)) / k for t, g in zip(truth, got)])


def test_tune_ivf_picks_cheapest_nprobe_and_queries_use_it(tmp_path):
    vs = _vs()
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="ivf", ivf_nlist=64, ivf_nprobe=1, gpu=False))
    result = tune_index_dir(tmp_path / "ix", recall=0.9, sample=300, k=10)
    assert result.reached and result.chosen.recall >= 0.9
    nprobe = int(result.chosen.name.split("=")[1])
    assert 1 < nprobe < 64
    # every cheaper setting the sweep measured missed the target
    cheaper = [s for s in result.tried if int(s.name.split("=")[1]) < nprobe]
    assert cheaper and all(s.recall < 0.9 for s in cheaper)
    m = read_manifest(tmp_path / "ix")
    assert m.params["nprobe"] == nprobe and m.params["search_params"] == f"nprobe={nprobe}"
    assert m.params["tuned"]["recall_target"] == 0.9 and m.params["tuned"]["reached"] is True
    # the stored recall agrees with an independent computation on the same held-out queries
    ids = np.sort(np.random.default_rng(0).choice(np.arange(len(vs)), size=300, replace=False))
    rec = independent_recall(vs, tmp_path / "ix" / m.index_file["name"], ids, f"nprobe={nprobe}")
    assert rec == pytest.approx(result.chosen.recall, abs=1e-9)
    # later queries open the index with the tuned nprobe
    idx = open_index_dir(tmp_path / "ix", use_gpu=False)
    assert faiss.extract_index_ivf(idx.index).nprobe == nprobe
    fresh = _vs(200, seed=5).vectors
    exact = np.argsort(-(fresh @ vs.vectors.T), axis=1)[:, :10]
    hits = search(idx, fresh, k=10)
    assert np.mean([len(set(e) & {h.row_id for h in hq}) / 10 for e, hq in zip(exact, hits)]) >= 0.85


@pytest.mark.slow
def test_tune_hnsw_with_tombstones_and_factory_string(tmp_path):
    vs = _vs(3000)
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="HNSW8", gpu=False))
    remove_from_index_dir(tmp_path / "ix", lambda ix: ix.live_ids % 4 == 0)  # tombstones (HNSW cannot remove)
    result = tune_index_dir(tmp_path / "ix", recall=0.97, sample=200)
    assert result.reached and result.chosen.name.startswith("efSearch=")
    m = read_manifest(tmp_path / "ix")
    assert m.params["ef_search"] == int(result.chosen.name.split("=")[1])
    # no removed row is ever in the truth or counted: re-check recall with numpy over live rows only
    idx = open_index_dir(tmp_path / "ix", use_gpu=False)
    live = idx.live_ids
    q = vs.vectors[live[:100]]
    sims = q @ vs.vectors[live].T
    truth = live[np.argsort(-sims, axis=1)[:, :10]]
    hits = search(idx, q, k=10)
    assert all(h.row_id % 4 for hq in hits for h in hq)
    assert np.mean([len(set(t) & {h.row_id for h in hq}) / 10 for t, hq in zip(truth, hits)]) >= 0.9


def test_tune_two_knobs_factory_string(tmp_path):
    vs = _vs(3000)
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="IVF32_HNSW8,Flat", gpu=False))
    result = tune_index_dir(tmp_path / "ix", recall=0.9, sample=200)
    assert result.reached and "nprobe=" in result.chosen.name and "quantizer_efSearch=" in result.chosen.name
    m = read_manifest(tmp_path / "ix")
    assert m.params["search_params"] == result.chosen.name
    idx = open_index_dir(tmp_path / "ix", use_gpu=False)
    ivf = faiss.extract_index_ivf(idx.index)
    settings = dict(part.split("=") for part in result.chosen.name.split(","))
    assert ivf.nprobe == m.params["nprobe"] == int(settings["nprobe"])
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == int(settings["quantizer_efSearch"])


def test_unreachable_recall_stores_the_best_and_says_so(tmp_path):
    vs = _vs(3000)
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="IVF16,PQ4x4np", gpu=False))
    result = tune_index_dir(tmp_path / "ix", recall=1.0, sample=200)
    assert not result.reached
    assert result.chosen.recall == max(s.recall for s in result.tried) < 1.0
    assert result.chosen.recall > 0.1 and not any("ht=" in s.name for s in result.tried)  # ht left out
    assert read_manifest(tmp_path / "ix").params["tuned"]["reached"] is False


def test_flat_needs_nothing(tmp_path):
    build_index_dir(tmp_path / "ix", _vs(500), IndexConfig(kind="flat", gpu=False))
    result = tune_index_dir(tmp_path / "ix", recall=0.99, sample=100)
    assert result.reached and result.chosen.recall == 1.0 and result.chosen.name == ""


def test_bad_arguments_and_concurrent_change(tmp_path, monkeypatch):
    vs = _vs(1000)
    build_index_dir(tmp_path / "ix", vs, IndexConfig(kind="ivf", ivf_nlist=16, gpu=False))
    for kwargs, says in [({"recall": 1.5}, "--recall"), ({"sample": 0}, "--sample"), ({"k": 5000}, "--k")]:
        with pytest.raises(RetrieveError, match=says):
            tune_index_dir(tmp_path / "ix", **kwargs)
    with pytest.raises(RetrieveError, match="no such index"):
        tune_index_dir(tmp_path / "nope")
    before = (tmp_path / "ix" / "manifest.json").read_text()
    import indexer.tune as tune

    real = tune.sweep

    def sweep_while_someone_adds(*a, **kw):
        out = real(*a, **kw)
        add_to_index_dir(tmp_path / "ix", _vs(10, seed=3, start=5000))
        return out

    monkeypatch.setattr(tune, "sweep", sweep_while_someone_adds)
    with pytest.raises(RetrieveError, match="changed while being tuned"):
        tune_index_dir(tmp_path / "ix", recall=0.9, sample=50)
    after = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert "tuned" not in after["params"] and after["count"] == 1010
    assert json.loads(before)["count"] == 1000


def _vectors_file(tmp_path, n=2000):
    from indexer.store import write_vectors

    path = tmp_path / "v.parquet"
    write_vectors(path, _vs(n))
    return path


def test_cli_kind_factory_string_tune_and_info(tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    v = _vectors_file(tmp_path)
    idx = tmp_path / "ix"
    code, _, err = run_cli(capsys, "index", "build", "--vectors", v, "--index", idx, "--kind", "IVF32,Flat")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()}
    code, _, err = run_cli(
        capsys, "index", "build", "--vectors", v, "--index", idx, "--kind", "IVF32,Bogus", "--overwrite"
    )
    assert code == 2
    assert_one_line_error(err, "--kind", "FAISS rejects it")
    assert {p.name: p.read_bytes() for p in idx.iterdir() if p.is_file()} == before
    code, out, err = run_cli(capsys, "index", "tune", "--index", idx, "--recall", "0.9", "--sample", "200")
    assert code == 0, err
    assert "stored nprobe=" in out and "<- stored" in out
    m = read_manifest(idx)
    assert m.params["tuned"]["recall_target"] == 0.9 and "nprobe" in m.params
    code, out, err = run_cli(capsys, "index", "info", "--index", idx, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["search_device"] == "cpu" and info["params"]["search_params"].startswith("nprobe=")
    code, out, _ = run_cli(capsys, "index", "info", "--index", idx)
    assert "search:    cpu" in out
    code, _, err = run_cli(capsys, "index", "tune", "--index", idx, "--recall", "2")
    assert code == 2
    assert_one_line_error(err, "--recall")
