"""`index compact` streamed (indexer.index_dir._rewrite_live): after removes it keeps the same live rows and ids
and gives the same answers as before (flat) or as a fresh streaming build of the live rows (IVF, HNSW, IVF
with on-disk lists), never reading the store whole; a compact that fails before its commit leaves the index
exactly as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import indexer.faiss_index as faiss_index
import indexer.index_dir as index_dir_module
import indexer.streaming as streaming
from indexer.config import IndexConfig
from indexer.index_dir import (
    IndexDir,
    add_to_index_dir,
    build_index_dir,
    compact_index_dir,
    open_index_dir,
    read_manifest,
    remove_from_index_dir,
    verify_index_dir,
)
from indexer.ondisk import lists_on_disk
from indexer.search import search
from indexer.shards import ShardReader
from indexer.store import VectorSet, write_vectors
from retrieval.errors import RetrieveError

DIM = 16
FP = {"encoder": "toy", "arch": {"type": "toy"}, "weights_sha256": "abc", "dim": DIM, "preprocess": {}}
SPEC = {"name": "toy", "weights": None, "seed": 0}
CHUNK = 64  # rows per new shard (CHUNK_BYTES below)
CONFIGS = {
    "flat": IndexConfig(kind="flat", gpu=False),
    "hnsw": IndexConfig(kind="hnsw", gpu=False, hnsw_m=8, hnsw_ef_search=16),
    "ivf": IndexConfig(kind="ivf", gpu=False, ivf_nlist=8, ivf_nprobe=3),
    "ivf-disk": IndexConfig(kind="ivf", gpu=False, ivf_nlist=8, ivf_nprobe=3, on_disk=True),
}

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Shards of CHUNK rows and a training sample of every 3rd vector, in compact and in the fresh streaming
    build it is compared with: several shards and a real sample."""
    for module in (index_dir_module, streaming):
        monkeypatch.setattr(module, "CHUNK_BYTES", 4 * DIM * CHUNK)
        monkeypatch.setattr(module, "TRAIN_SAMPLE", 160)


def vset(n: int, start: int = 0, seed: int = 0) -> VectorSet:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1).normal(size=(12, DIM))
    v = centres[rng.integers(0, 12, n)] + 0.7 * rng.normal(size=(n, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    j = np.arange(start, start + n)
    rows = pd.DataFrame(
        {
            "id": [f"img{i}.png" for i in j],
            "path": [f"/data/img{i}.png" for i in j],
            "label": [None if i % 11 == 0 else "abc"[i % 3] for i in j],
            "patient_id": [f"p{i // 5}" for i in j],
            "frame_index": pd.array([None if i % 2 else int(i) for i in j], dtype="Int64"),
        }
    )
    return VectorSet(rows, v.astype(np.float32), FP, SPEC)


def prepared(folder: Path, name: str) -> int:
    """An index of three shards (a build and two adds, 600 rows) with 124 rows removed; returns that number."""
    build_index_dir(folder, vset(400), CONFIGS[name])
    add_to_index_dir(folder, vset(150, start=400, seed=1))
    add_to_index_dir(folder, vset(50, start=550, seed=2))
    _, by_id = remove_from_index_dir(folder, lambda idx: idx.live_ids % 5 == 0)
    _, by_patient = remove_from_index_dir(folder, lambda idx: idx.read_columns(["patient_id"])["patient_id"].eq("p3"))
    return by_id + by_patient


def answers(folder: Path, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    idx = open_index_dir(folder, use_gpu=False)
    hits = search(idx, queries, k=k)
    return np.array([[h.row_id for h in q] for q in hits]), np.array([[h.score for h in q] for q in hits])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of the folder (the writer lock aside) with the SHA-256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compact_keeps_rows_and_ids_and_answers_as_a_fresh_streaming_build(tmp_path, monkeypatch, name):
    folder = tmp_path / "idx"
    removed = prepared(folder, name)
    before = open_index_dir(folder, use_gpu=False)
    live, rows, vectors = before.live_ids.copy(), before.rows.copy(), before.vectors.vectors.copy()
    queries = vset(40, start=10_000, seed=7).vectors
    ids_before, scores_before = answers(folder, queries)
    next_id = read_manifest(folder).next_id

    # the store is never read whole (IndexDir.vectors, ShardReader.read); FAISS gets one shard at a time
    added: list[int] = []
    real_fill = index_dir_module.fill_index

    def fill(index, batches, **kw):
        def counted():
            for v, i in batches():
                added.append(len(v))
                yield v, i

        return real_fill(index, counted, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(IndexDir, "vectors", property(lambda self: pytest.fail("read the store whole")))
        mp.setattr(ShardReader, "read", lambda *a, **kw: pytest.fail("read the store whole"))
        mp.setattr(index_dir_module, "fill_index", fill)
        m, dropped = compact_index_dir(folder)

    assert dropped == removed == 124 and m.removed == [] and m.count == len(live) == 476 and m.next_id == next_id
    assert [s["rows"] for s in m.shards] == [CHUNK] * 7 + [476 - 7 * CHUNK] and added == [s["rows"] for s in m.shards]
    assert verify_index_dir(folder) == []
    after = open_index_dir(folder, use_gpu=False)
    assert np.array_equal(after.live_ids, live) and after.index.ntotal == len(live)
    pd.testing.assert_frame_equal(after.rows, rows)
    assert np.array_equal(after.vectors.vectors, vectors)
    assert m.labels == before.manifest.labels
    ids_after, scores_after = answers(folder, queries)
    if name == "flat":  # exact: the same answers as before compact
        assert np.array_equal(ids_after, ids_before)
        np.testing.assert_allclose(scores_after, scores_before, rtol=1e-6)
    if name == "ivf-disk":
        assert m.params["lists"] == "on_disk" and lists_on_disk(after.index) is not None
        assert sorted(p.name for p in folder.glob("*.ivfdata")) == [m.lists_file["name"]]

    # a fresh streaming build of the live rows (ids 0..n-1 there: position j is live[j] here)
    write_vectors(tmp_path / "live.parquet", VectorSet(rows, vectors, FP, SPEC))
    fresh = streaming.build_from_vectors(tmp_path / "fresh", tmp_path / "live.parquet", CONFIGS[name])
    assert fresh.params["factory"] == m.params["factory"]
    fresh_ids, fresh_scores = answers(tmp_path / "fresh", queries)
    assert (fresh_ids >= 0).all()
    assert np.array_equal(live[fresh_ids], ids_after)
    np.testing.assert_allclose(scores_after, fresh_scores, rtol=1e-6)

    m2, _ = add_to_index_dir(folder, vset(5, start=900, seed=3))  # ids are never reused
    assert m2.shards[-1]["id_min"] == next_id and verify_index_dir(folder) == []


def _raise_on_second_shard(monkeypatch):
    real = index_dir_module.write_shard
    calls = []

    def write(path, vs, ids):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, vs, ids)

    monkeypatch.setattr(index_dir_module, "write_shard", write)


def _raise_in_fill(monkeypatch):
    """Ctrl-C while FAISS is filled, at its third shard (for on-disk lists: with part files written)."""
    real = index_dir_module.fill_index

    def fill(index, batches, **kw):
        def interrupted():
            for k, batch in enumerate(batches()):
                if k == 2:
                    raise KeyboardInterrupt
                yield batch

        return real(index, interrupted, **kw)

    monkeypatch.setattr(index_dir_module, "fill_index", fill)


def _raise_at_the_rename(monkeypatch):
    """The new FAISS file (and lists file) written, the manifest's rename not done."""

    def atomic(path):
        raise OSError("no space left for the manifest")

    monkeypatch.setattr(index_dir_module, "atomic_path", atomic)


@pytest.mark.parametrize("name", ["flat", "hnsw", "ivf-disk"])
@pytest.mark.parametrize("fail", [_raise_on_second_shard, _raise_in_fill, _raise_at_the_rename])
def test_a_compact_interrupted_before_its_commit_leaves_the_index_as_it_was(tmp_path, monkeypatch, name, fail):
    folder = tmp_path / "idx"
    prepared(folder, name)
    queries = vset(20, start=10_000, seed=7).vectors
    files, expected = snapshot(folder), answers(folder, queries)
    with monkeypatch.context() as mp, pytest.raises((OSError, KeyboardInterrupt)):
        fail(mp)
        compact_index_dir(folder)
    assert snapshot(folder) == files  # the same files, the same bytes: nothing new left behind
    got = answers(folder, queries)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert verify_index_dir(folder) == []
    assert faiss_index._LISTS_ON_DISK == {} and faiss_index._TRAIN_ON_GPU == {}  # no new index kept alive
    m, dropped = compact_index_dir(folder)  # and a compact then goes through
    assert dropped == 124 and m.count == 476 and verify_index_dir(folder) == []


@pytest.mark.parametrize("name", ["ivf", "ivf-disk"])
def test_compact_with_every_row_removed_keeps_its_one_line_error(tmp_path, name):
    folder = tmp_path / "idx"
    build_index_dir(folder, vset(300), CONFIGS[name])
    remove_from_index_dir(folder, lambda idx: idx.live_ids >= 0)
    files = snapshot(folder)
    with pytest.raises(RetrieveError, match=r"every row is removed and a ivf index cannot be trained.*--overwrite"):
        compact_index_dir(folder)
    assert snapshot(folder) == files and verify_index_dir(folder) == []


def test_compact_of_a_flat_index_with_every_row_removed_empties_it(tmp_path):
    folder = tmp_path / "idx"
    build_index_dir(folder, vset(50), CONFIGS["flat"])
    remove_from_index_dir(folder, lambda idx: idx.live_ids >= 0)
    m, dropped = compact_index_dir(folder)
    assert dropped == 50 and m.count == 0 and m.shards == [] and m.next_id == 50
    assert open_index_dir(folder, use_gpu=False).index.ntotal == 0 and verify_index_dir(folder) == []
    with pytest.raises(RetrieveError, match="^the index is empty"):  # a query says so, not "k > 0 images"
        search(open_index_dir(folder, use_gpu=False), np.ones((1, DIM), np.float32), 1)


def test_compact_of_a_format_1_index_writes_format_2(tmp_path):
    from test_index_safety import _legacy_index

    folder = _legacy_index(tmp_path / "idx")
    before = open_index_dir(folder, use_gpu=False)
    rows, vectors = before.rows.copy(), before.vectors.vectors.copy()
    m, dropped = compact_index_dir(folder)
    assert dropped == 0 and m.format == 2 and m.count == 20 and m.next_id == 20 and verify_index_dir(folder) == []
    assert not (folder / "vectors.parquet").exists() and not (folder / "index.faiss").exists()
    after = open_index_dir(folder, use_gpu=False)
    assert list(after.live_ids) == list(range(20)) and np.array_equal(after.vectors.vectors, vectors)
    pd.testing.assert_frame_equal(after.rows, rows)
    assert [h.row_id for h in search(after, vectors[[4]], 3)[0]][0] == 4
