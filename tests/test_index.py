"""Parquet vector store, FAISS index kinds, index folders (build, add, atomicity)."""

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from indexer.faiss_index import INDEX_KINDS, build_index, choose_kind
from indexer.index_dir import add_to_index_dir, build_index_dir, open_index_dir, read_manifest
from indexer.search import candidate_mask, search
from indexer.store import FINGERPRINT_KEY, VectorSet, read_vectors, write_vectors
from retrieval.config import IndexConfig
from retrieval.errors import EncoderMismatchError, RetrieveError

FP = {"encoder": "toy", "arch": {"type": "toy"}, "weights_sha256": "abc", "dim": 16, "preprocess": {"image_size": 8}}


def _vs(n=300, seed=0, start=0, fp=FP):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rows = pd.DataFrame(
        {
            "id": [f"img{start + j}.png" for j in range(n)],
            "path": [f"/data/img{start + j}.png" for j in range(n)],
            "label": [["a", "b", "c"][j % 3] for j in range(n)],
            "patient_id": [f"p{(start + j) // 5}" for j in range(n)],
            "frame_index": pd.array([None] * n, dtype="Int64"),
            "site": [("x" if j % 2 else 7) for j in range(n)],  # mixed types survive as text
        }
    )
    return VectorSet(rows, v, fp, {"name": "toy", "weights": None, "seed": 0})


def test_parquet_roundtrip(tmp_path):
    vs = _vs(20)
    write_vectors(tmp_path / "v.parquet", vs)
    schema = pq.read_schema(tmp_path / "v.parquet")
    assert str(schema.field("vector").type) == "fixed_size_list<element: float>[16]"
    assert json.loads(schema.metadata[FINGERPRINT_KEY]) == FP
    back = read_vectors(tmp_path / "v.parquet")
    assert np.array_equal(back.vectors, vs.vectors)
    assert back.rows["id"].tolist() == vs.rows["id"].tolist()
    assert back.rows["site"].tolist()[:2] == ["7", "x"]


def test_parquet_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "v.parquet"
    write_vectors(target, _vs(5))
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        write_vectors(target, _vs(9, seed=3))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.parquet"]


def test_read_vectors_errors(tmp_path):
    with pytest.raises(RetrieveError, match="not found"):
        read_vectors(tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_text("no")
    with pytest.raises(RetrieveError, match="not a readable Parquet"):
        read_vectors(tmp_path / "bad.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(RetrieveError, match="not a vectors file"):
        read_vectors(tmp_path / "other.parquet")


def test_auto_rule():
    assert choose_kind(10) == "flat" and choose_kind(99_999) == "flat"
    assert choose_kind(100_000) == "hnsw" and choose_kind(1_000_000) == "ivfsq"


@pytest.mark.parametrize("kind", sorted(INDEX_KINDS))
def test_every_kind_finds_itself(kind):
    vs = _vs(400)
    index, resolved, params = build_index(vs.vectors, kind, IndexConfig(), use_gpu=False)
    assert resolved == kind and index.ntotal == 400
    _, ids = index.search(vs.vectors[:50], 1)
    hit_rate = float(np.mean(ids[:, 0] == np.arange(50)))
    assert hit_rate >= (1.0 if kind in ("flat", "hnsw", "ivf") else 0.5), hit_rate


def test_build_add_info_and_search(tmp_path):
    d = tmp_path / "idx"
    m = build_index_dir(d, _vs(100), IndexConfig(kind="flat"))
    names = sorted(os.listdir(d))
    tag = m.index_file["name"][6:19]
    assert names == [".lock", ".retrieve-index", f"index-{tag}.faiss", "manifest.json", f"shard-{tag}.parquet"]
    assert m.count == 100 and m.kind == "flat" and read_manifest(d).fingerprint == FP
    with pytest.raises(RetrieveError, match="already exists"):
        build_index_dir(d, _vs(10), IndexConfig())
    m2, added = add_to_index_dir(d, _vs(30, seed=1, start=100))
    assert added == 30 and m2.count == 130 and m2.created == m.created
    _, again = add_to_index_dir(d, _vs(30, seed=1, start=100))
    assert again == 0  # already indexed
    idx = open_index_dir(d, use_gpu=False)
    assert idx.index.ntotal == 130 and len(idx.rows) == 130
    hits = search(idx, idx.vectors.vectors[[120]], 3)[0]
    assert hits[0].position == 120 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no staging folders left
    m3 = read_manifest(d)
    assert m3.generation == 2 and len(m3.shards) == 2  # add appended a shard, the first is untouched
    assert m3.shards[0] == m.shards[0] and len(os.listdir(d)) == 6  # the old FAISS file is gone


def test_add_refuses_other_encoder_and_leaves_index_intact(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(50), IndexConfig())
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(EncoderMismatchError, match="weights differ"):
        add_to_index_dir(d, _vs(5, start=50, fp={**FP, "weights_sha256": "zzz"}))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_filters_are_exact_with_overfetch(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(200), IndexConfig(kind="flat"))
    idx = open_index_dir(d, use_gpu=False)
    q = idx.vectors.vectors[[0]]
    allowed = candidate_mask(idx.rows, ["p0"], [("label", "a")])
    hits = search(idx, q, 10, allowed)[0]
    sims = idx.vectors.vectors @ q[0]
    sims[~allowed] = -np.inf
    assert [h.position for h in hits] == list(np.argsort(-sims)[:10])
    assert all(idx.rows.label[h.position] == "a" and idx.rows.patient_id[h.position] != "p0" for h in hits)
    with pytest.raises(RetrieveError, match="unknown label 'zebra'"):
        candidate_mask(idx.rows, [], [("label", "zebra")])
    with pytest.raises(RetrieveError, match="unknown column 'colour'"):
        candidate_mask(idx.rows, [], [("colour", "red")])
    with pytest.raises(RetrieveError, match="larger than the 200"):
        search(idx, q, 201)
