"""On-disk IVF lists (`index build --on-disk`, indexer/ondisk.py): the same answers as the in-memory IVF,
add, remove and compact through new lists files, reopening (also after moving the folder), bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_one_line_error, run_cli

from indexer.config import IndexConfig
from indexer.errors import RetrieveError
from indexer.faiss_index import check_on_disk_kind
from indexer.index_dir import (
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
from indexer.store import VectorSet, write_vectors
from indexer.streaming import StreamingBuild

DIM = 32
FP = {"encoder": "toy", "arch": {"type": "toy"}, "weights_sha256": "abc", "dim": DIM, "preprocess": {}}
SPEC = {"name": "toy", "weights": None, "seed": 0}
KINDS = ["ivf", "ivfsq", "ivfpq", "PCA16,IVF16,SQ8"]


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1).normal(size=(25, DIM))
    v = centres[rng.integers(0, 25, n)] + 0.6 * rng.normal(size=(n, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)


def vset(n: int, start: int = 0, seed: int = 0) -> VectorSet:
    rows = pd.DataFrame(
        {
            "id": [f"img{start + j}" for j in range(n)],
            "path": [f"/data/img{start + j}.png" for j in range(n)],
            "label": [("a", "b", "c")[j % 3] for j in range(n)],
            "patient_id": [f"p{(start + j) // 10}" for j in range(n)],
            "frame_index": pd.array([None] * n, dtype="Int64"),
        }
    )
    return VectorSet(rows, clustered(n, seed), FP, SPEC)


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def cfg(kind: str, on_disk: bool) -> IndexConfig:
    return IndexConfig(kind=kind, gpu=False, on_disk=on_disk, ivf_nlist=16, ivf_nprobe=4)


def answers(folder, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    idx = open_index_dir(folder, use_gpu=False)
    hits = search(idx, queries, k=k)
    return np.array([[h.row_id for h in q] for q in hits]), np.array([[h.score for h in q] for q in hits])


def lists_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".ivfdata")


@pytest.mark.parametrize("kind", KINDS)
def test_on_disk_answers_equal_the_in_memory_ivf(tmp_path, kind):
    vs = vset(3000)
    build_index_dir(tmp_path / "mem", vs, cfg(kind, False))
    m = build_index_dir(tmp_path / "disk", vs, cfg(kind, True))
    assert m.params["lists"] == "on_disk" and m.params["removal"] == "tombstone"
    assert lists_files(tmp_path / "disk") == [m.lists_file["name"]]
    assert (tmp_path / "disk" / m.lists_file["name"]).stat().st_size == m.lists_file["size"] > 0
    queries = clustered(40, seed=5)
    ids_mem, s_mem = answers(tmp_path / "mem", queries)
    ids_disk, s_disk = answers(tmp_path / "disk", queries)
    np.testing.assert_array_equal(ids_disk, ids_mem)
    np.testing.assert_allclose(s_disk, s_mem, rtol=1e-5, atol=1e-6)
    idx = open_index_dir(tmp_path / "disk", use_gpu=False)
    assert lists_on_disk(idx.index) is not None and idx.index.ntotal == 3000
    assert verify_index_dir(tmp_path / "disk") == []


def test_all_lists_probed_is_exact_search(tmp_path):
    """nprobe = nlist over IVF,Flat visits every vector: the answer is numpy's exact top 10."""
    vs = vset(2000)
    build_index_dir(tmp_path / "d", vs, IndexConfig(kind="ivf", gpu=False, on_disk=True, ivf_nlist=8, ivf_nprobe=8))
    queries = clustered(20, seed=9)
    ids, scores = answers(tmp_path / "d", queries)
    sims = queries @ vs.vectors.T
    truth = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, truth, axis=1), rtol=1e-5, atol=1e-5)


def test_streaming_build_goes_through_parts_and_equals_in_memory(tmp_path, monkeypatch):
    import indexer.faiss_index as fi

    filled = []
    real = fi.fill_on_disk
    monkeypatch.setattr(fi, "fill_on_disk", lambda *a: filled.append(a[2]) or real(*a))
    vs = vset(3000)
    build_index_dir(tmp_path / "mem", vs, cfg("ivfsq", False))
    with StreamingBuild(tmp_path / "s", FP, SPEC, cfg("ivfsq", True)) as build:
        for start in range(0, 3000, 700):  # 5 parts of unequal size
            part = VectorSet(
                vs.rows.iloc[start : start + 700].reset_index(drop=True), vs.vectors[start : start + 700], FP, SPEC
            )
            build.add(part)
        m = build.finish()
    assert m.lists_file and m.count == 3000
    assert filled == [tmp_path / "s"]  # filled part by part into the folder, never whole in memory
    left = [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    assert left == []  # the FAISS part files were removed after the merge
    queries = clustered(30, seed=3)
    np.testing.assert_array_equal(answers(tmp_path / "s", queries)[0], answers(tmp_path / "mem", queries)[0])
    assert verify_index_dir(tmp_path / "s") == []


def test_add_writes_a_new_lists_file_and_a_reader_keeps_the_old(tmp_path):
    base, more = vset(2500), vset(500, start=10_000, seed=1)
    build_index_dir(tmp_path / "mem", base, cfg("ivf", False))
    m0 = build_index_dir(tmp_path / "disk", base, cfg("ivf", True))
    reader = open_index_dir(tmp_path / "disk", use_gpu=False)
    before = search(reader, more.vectors[:5], k=3)
    add_to_index_dir(tmp_path / "mem", more)
    m1, added = add_to_index_dir(tmp_path / "disk", more)
    assert added == 500 and m1.count == 3000
    assert m1.lists_file["name"] != m0.lists_file["name"]
    assert lists_files(tmp_path / "disk") == [m1.lists_file["name"]]  # the old version's file was collected
    # a new vector finds itself first (its own row id: 2500 + j)
    ids, scores = answers(tmp_path / "disk", more.vectors[:20], k=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(2500, 2520))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    queries = clustered(30, seed=4)
    np.testing.assert_array_equal(answers(tmp_path / "disk", queries)[0], answers(tmp_path / "mem", queries)[0])
    # the reader opened before the add still answers from its version (the old file stays mapped)
    again = search(reader, more.vectors[:5], k=3)
    assert [[h.row_id for h in q] for q in again] == [[h.row_id for h in q] for q in before]
    assert all(h.row_id < 2500 for q in again for h in q)
    assert verify_index_dir(tmp_path / "disk") == []


def test_remove_is_a_tombstone_until_compact(tmp_path):
    vs = vset(3000)
    folder = tmp_path / "d"
    m0 = build_index_dir(folder, vs, cfg("ivfsq", True))
    gone = np.arange(0, 3000, 7)
    m1, removed = remove_from_index_dir(folder, lambda idx: np.isin(idx.live_ids, gone))
    assert removed == len(gone) and m1.count == 3000 - len(gone)
    assert m1.lists_file["name"] == m0.lists_file["name"]  # the committed lists file is not rewritten
    idx = open_index_dir(folder, use_gpu=False)
    assert idx.index.ntotal == 3000  # still in the lists, skipped by every search
    ids, _ = answers(folder, vs.vectors[gone[:50]], k=10)
    assert not np.isin(ids, gone).any() and (ids >= 0).all()
    m2, dropped = compact_index_dir(folder)
    assert dropped == len(gone) and m2.count == 3000 - len(gone) and m2.params["lists"] == "on_disk"
    assert m2.lists_file["name"] != m0.lists_file["name"] and lists_files(folder) == [m2.lists_file["name"]]
    idx = open_index_dir(folder, use_gpu=False)
    assert idx.index.ntotal == m2.count and lists_on_disk(idx.index) is not None
    ids, _ = answers(folder, vs.vectors[:40], k=10)
    assert not np.isin(ids, gone).any()
    assert verify_index_dir(folder) == []
    # after compact, add still appends to on-disk lists, with ids that were never used
    m3, added = add_to_index_dir(folder, vset(100, start=50_000, seed=2))
    assert added == 100 and m3.next_id == 3100 and m3.lists_file["name"] != m2.lists_file["name"]


def test_reopens_after_the_folder_moves(tmp_path, monkeypatch):
    vs = vset(2000)
    build_index_dir(tmp_path / "a" / "idx", vs, cfg("ivfpq", True))
    expected = answers(tmp_path / "a" / "idx", vs.vectors[:10])[0]
    shutil.move(tmp_path / "a" / "idx", tmp_path / "b")
    monkeypatch.chdir(tmp_path)  # the lists file is found beside the index, not from the working folder
    np.testing.assert_array_equal(answers(tmp_path / "b", vs.vectors[:10])[0], expected)
    assert verify_index_dir(tmp_path / "b") == []


def test_damaged_lists_file_is_refused_without_a_crash(tmp_path):
    folder = tmp_path / "d"
    m = build_index_dir(folder, vset(2000), cfg("ivf", True))
    lists = folder / m.lists_file["name"]
    data = lists.read_bytes()
    lists.write_bytes(data[: len(data) // 2])  # mapping past the end would crash the first query
    with pytest.raises(RetrieveError, match="damaged"):
        open_index_dir(folder, use_gpu=False)
    lists.write_bytes(data[:-8] + b"\x00" * 8)  # same size, other content
    assert any("SHA-256" in p for p in verify_index_dir(folder))
    lists.unlink()
    with pytest.raises(RetrieveError, match="missing"):
        open_index_dir(folder, use_gpu=False)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "HNSW16", "IVF16,PQ8x4fs"])
def test_kinds_without_on_disk_lists_are_refused(tmp_path, kind):
    with pytest.raises(RetrieveError, match="--on-disk"):
        build_index_dir(tmp_path / "d", vset(1000), cfg(kind, True))
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_a_failed_training_keeps_no_index_alive(tmp_path):
    import indexer.faiss_index as fi

    with pytest.raises(RetrieveError, match="could not train"):
        build_index_dir(tmp_path / "d", vset(20), cfg("IVF64,Flat", True))  # 20 training points for 64 lists
    assert fi._LISTS_ON_DISK == {} and fi._TRAIN_ON_GPU == {}


def test_check_on_disk_kind_before_any_work():
    check_on_disk_kind("ivf")
    check_on_disk_kind("auto")  # auto means ivfsq with --on-disk
    check_on_disk_kind("OPQ64,IVF4096,PQ64")
    for kind in ("flat", "hnsw", "PCA256,HNSW32"):
        with pytest.raises(RetrieveError, match="no inverted lists"):
            check_on_disk_kind(kind)


def test_auto_on_disk_is_ivfsq(tmp_path):
    m = build_index_dir(tmp_path / "d", vset(1000), IndexConfig(kind="auto", gpu=False, on_disk=True))
    assert m.kind == "ivfsq" and m.lists_file


@pytest.mark.slow
def test_faiss_printf_stays_off_stdout(tmp_path):
    """OnDiskInvertedLists prints "resizing FILE" with C printf; a writer's stdout (JSON for front ends) stays ours."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from test_ondisk import cfg, vset; "
        "from indexer.index_dir import build_index_dir, add_to_index_dir; "
        "build_index_dir(sys.argv[1], vset(600), cfg('ivf', True)); add_to_index_dir(sys.argv[1], vset(50, 10**6)); "
        "print('done')"
    )
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d"), tests], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "done\n"


@pytest.mark.slow
def test_cli_build_on_disk_info_and_remove(tmp_path, capfd):
    vectors = write_vectors(tmp_path / "v.parquet", vset(1500))
    index = tmp_path / "idx"
    code, out, err = run_cli(
        capfd, "index", "build", "--vectors", vectors, "--index", index, "--kind", "ivf", "--on-disk"
    )
    assert code == 0, err
    code, out, err = run_cli(capfd, "index", "info", "--index", index)
    assert code == 0 and "lists:     on disk" in out and "memory-mapped" in out, out
    code, out, _ = run_cli(capfd, "index", "info", "--index", index, "--json")
    info = json.loads(out)
    assert info["lists_file"]["size"] > 0 and info["search_device"] == "cpu"
    code, _, err = run_cli(
        capfd, "index", "build", "--vectors", vectors, "--index", tmp_path / "h", "--kind", "hnsw", "--on-disk"
    )
    assert code == 2
    assert_one_line_error(err, "--on-disk")
    assert not (tmp_path / "h").exists()
    assert read_manifest(index).params["lists"] == "on_disk"
    assert os.listdir(index).count(info["lists_file"]["name"]) == 1
    code, out, err = run_cli(capfd, "index", "remove", "--index", index, "--where", "label=a")
    assert code == 0, err
    assert out.strip() == (
        "removed 500 images; index now holds 1000 (on-disk lists: skipped by every search now, "
        "space reclaimed by `retrieve index compact`)"
    )


def test_overwrite_on_disk_with_in_file_and_back(tmp_path):
    folder = tmp_path / "d"
    build_index_dir(folder, vset(1200), cfg("ivf", True))
    m = build_index_dir(folder, vset(1200), cfg("ivf", False), overwrite=True)
    assert m.lists_file == {} and "lists" not in m.params and lists_files(folder) == []
    assert lists_on_disk(open_index_dir(folder, use_gpu=False).index) is None
    m = build_index_dir(folder, vset(1200), cfg("ivf", True), overwrite=True)
    assert lists_files(folder) == [m.lists_file["name"]] and verify_index_dir(folder) == []
