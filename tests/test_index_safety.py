"""Nothing already stored is lost: --overwrite, crashes during a commit, damaged files, file modes."""

import json
import os
import shutil
import stat

import faiss
import numpy as np
import pytest
from conftest import run_cli
from test_index import FP, _vs

from indexer import index_dir as index_dir_module
from indexer.config import IndexConfig
from indexer.index_dir import (
    MANIFEST,
    add_to_index_dir,
    build_index_dir,
    open_index_dir,
    read_manifest,
    verify_index_dir,
)
from indexer.store import write_vectors
from retrieval.errors import RetrieveError


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_the_data_folder_itself(tmp_path, capsys, demo_data):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    before = _tree(data)
    code, _, err = run_cli(capsys, "index", "build", data, "--index", data, "--overwrite", "--quiet")
    assert code == 2 and "overlaps the data" in err
    assert _tree(data) == before


def test_overwrite_refuses_the_current_folder_and_its_parents(tmp_path, capsys, monkeypatch, demo_data):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", ".."):
        code, _, err = run_cli(capsys, "index", "build", demo_data, "--index", target, "--overwrite", "--quiet")
        assert code == 2 and "current folder" in err, err
    assert (work / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_not_an_index(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    (foreign / "manifest.json").write_text('{"some": "other tool"}')
    with pytest.raises(RetrieveError, match="not a retrieve index folder"):
        build_index_dir(foreign, _vs(10), IndexConfig(), overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg", "manifest.json"]


def test_overwrite_replaces_only_our_files_in_an_index(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(30), IndexConfig())
    (d / "README.txt").write_text("a user's note beside the index")
    m = build_index_dir(d, _vs(12, seed=3), IndexConfig(), overwrite=True)
    assert m.count == 12 and m.generation == 2
    assert (d / "README.txt").read_text() == "a user's note beside the index"
    assert len(open_index_dir(d, use_gpu=False).rows) == 12


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("failure", ["no readable image", "FAISS cannot train"])
def test_a_failed_overwrite_build_leaves_the_index_it_would_replace(tmp_path, capsys, failure):
    """`index build --overwrite` that fails (after the folder check) keeps every file of the committed index:
    a streaming build once deleted the index's part-*.parquet shards at its start (a data loss found in
    session 9); the old files go only with the new build's commit."""
    from PIL import Image

    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(good / f"im{i}.png")
    idx = tmp_path / "idx"
    build = ["index", "build", "--index", idx, "-e", "cnn5", "--image-size", "32", "-q", "--no-gpu"]
    code, _, err = run_cli(capsys, *build[:2], good, *build[2:])
    assert code == 0, err
    assert any(p.name.startswith("part-") for p in idx.iterdir())  # the shards a build from images writes
    before = _folder_bytes(idx)
    if failure == "no readable image":
        bad = tmp_path / "bad" / "a"
        bad.mkdir(parents=True)
        (bad / "zero.png").write_bytes(b"")
        args = [*build[:2], bad.parent, *build[2:], "--overwrite"]
    else:
        args = [*build[:2], good, *build[2:], "--overwrite", "--kind", "IVF99999,Flat"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    after = _folder_bytes(idx)
    assert {k: after.get(k) for k in before} == before
    extra = set(after) - set(before)  # what `--resume` would continue from: its state and its own new parts
    assert all(k == "build.json" or k.startswith("part-") for k in extra), extra
    assert verify_index_dir(idx) == []
    code, out, err = run_cli(capsys, "query", good / "im0.png", "--index", idx, "--k", "2", "--no-gpu")
    assert code == 0, err
    if failure == "FAISS cannot train":  # a compact meanwhile: the old parts it replaces go, the resumable ones stay
        resumable = {p["name"] for p in json.loads((idx / "build.json").read_text())["parts"]}
        assert resumable and resumable <= {p.name for p in idx.iterdir()}
        code, _, err = run_cli(capsys, "index", "compact", "--index", idx)
        assert code == 0, err
        parts = {p.name for p in idx.iterdir() if p.name.startswith("part-")}
        assert parts == resumable and verify_index_dir(idx) == []
    # a new build that succeeds replaces them (the old parts go with its commit)
    code, _, err = run_cli(capsys, *build[:2], good, *build[2:], "--overwrite")
    assert code == 0, err
    assert not set(before) & {p.name for p in idx.iterdir() if p.name.startswith("part-")}


def test_index_pointing_at_a_file_is_a_clean_error(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, _, err = run_cli(capsys, "index", "info", "--index", f)
    assert code == 2 and "is a file" in err
    with pytest.raises(RetrieveError, match="is a file"):
        build_index_dir(f, _vs(5), IndexConfig())


def test_crash_before_the_manifest_switch_keeps_the_old_version(tmp_path, monkeypatch):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(40), IndexConfig())
    before = open_index_dir(d, use_gpu=False).rows["id"].tolist()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(index_dir_module, "save_index", crash)  # after the vectors file, before the manifest
    with pytest.raises(KeyboardInterrupt):
        add_to_index_dir(d, _vs(10, seed=1, start=40))
    monkeypatch.undo()
    assert open_index_dir(d, use_gpu=False).rows["id"].tolist() == before
    assert verify_index_dir(d) == []
    m, added = add_to_index_dir(d, _vs(10, seed=1, start=40))  # the next write cleans the orphans up
    assert added == 10 and m.count == 50
    assert {p.name for p in d.iterdir() if p.suffix in (".parquet", ".faiss")} == set(m.file_names())


def _legacy_index(folder, n=20):
    """A format 1 folder as the previous release wrote it: fixed names, row positions as ids, no checksums."""
    vs = _vs(n)
    folder.mkdir(parents=True, exist_ok=True)
    write_vectors(folder / "vectors.parquet", vs)
    index = faiss.IndexFlatIP(vs.dim)
    index.add(vs.vectors)
    faiss.write_index(index, str(folder / "index.faiss"))
    manifest = {
        "count": n, "dim": vs.dim, "metric": "cosine", "kind": "flat", "params": {"built_on": "cpu"},
        "fingerprint": FP, "encoder_spec": vs.encoder_spec, "created": "2026-01-01T00:00:00+00:00",
        "updated": "2026-01-01T00:00:00+00:00", "labels": {"a": 7, "b": 7, "c": 6},
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_leftovers_of_an_interrupted_two_rename_commit_are_recovered(tmp_path):
    d = tmp_path / "idx"
    _legacy_index(tmp_path / ".idx.old-k2j4")  # crash between "index -> old" and "staging -> index"
    (tmp_path / ".idx.building-x7").mkdir()
    (tmp_path / ".idx.building-x7" / "vectors.parquet").write_bytes(b"half written")
    assert read_manifest(d).count == 20
    assert len(open_index_dir(d, use_gpu=False).rows) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_format_1_index_is_read_and_upgraded_on_its_next_write(tmp_path):
    d = _legacy_index(tmp_path / "idx")
    assert read_manifest(d).legacy and len(open_index_dir(d, use_gpu=False).rows) == 20
    assert any("no checksums" in p for p in verify_index_dir(d))
    m, _ = add_to_index_dir(d, _vs(5, seed=2, start=20))
    assert m.format == 2 and len(m.shards) == 2 and m.next_id == 25
    assert not (d / "vectors.parquet").exists() and verify_index_dir(d) == []


@pytest.mark.slow
def test_swapped_faiss_file_is_caught_by_verify_and_resized_one_on_open(tmp_path, capsys):
    d = tmp_path / "idx"
    m = build_index_dir(d, _vs(60, seed=0), IndexConfig(kind="flat"))
    other = tmp_path / "other"
    build_index_dir(other, _vs(60, seed=9), IndexConfig(kind="flat"))
    target = d / m.index_file["name"]
    shutil.copy(other / read_manifest(other).index_file["name"], target)  # same shape, other vectors
    assert run_cli(capsys, "index", "info", "--index", d)[0] == 0  # sizes still agree: info cannot tell
    code, _, err = run_cli(capsys, "index", "verify", "--index", d)
    assert code == 2 and "SHA-256 differs" in err
    faiss.write_index(faiss.IndexFlatIP(16), str(target))  # now a different size
    with pytest.raises(RetrieveError, match="damaged"):
        open_index_dir(d, use_gpu=False)
    code, out, _ = run_cli(capsys, "index", "info", "--index", d)
    assert code == 2 and "DAMAGED" in out
    code, _, err = run_cli(capsys, "query", __file__, "--index", d)
    assert code == 2 and "Traceback" not in err


def test_faiss_file_of_another_dimension_is_a_clean_error(tmp_path):
    d = tmp_path / "idx"
    m = build_index_dir(d, _vs(10), IndexConfig(kind="flat"))
    target = d / m.index_file["name"]
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(np.zeros((10, 8), dtype=np.float32), np.arange(10))
    faiss.write_index(index, str(target))
    m.index_file["size"] = target.stat().st_size  # as if the manifest had been edited to match
    (d / MANIFEST).write_text(m.to_json())
    with pytest.raises(RetrieveError, match="8-d"):
        open_index_dir(d, use_gpu=False)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        d = tmp_path / "idx"
        build_index_dir(d, _vs(10), IndexConfig())
        add_to_index_dir(d, _vs(5, seed=1, start=10))
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    for p in d.iterdir():
        if p.name != ".lock":
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name


def test_second_writer_waits_then_fails_with_a_clear_message(tmp_path, monkeypatch):
    from filelock import FileLock

    d = tmp_path / "idx"
    build_index_dir(d, _vs(10), IndexConfig())
    monkeypatch.setenv("RETRIEVE_LOCK_TIMEOUT", "0.2")
    held = FileLock(str(d / ".lock"))
    with held:  # another process's writer, as far as fcntl is concerned (a separate open file)
        with pytest.raises(RetrieveError, match="another process has been writing"):
            add_to_index_dir(d, _vs(5, seed=1, start=10))
    assert add_to_index_dir(d, _vs(5, seed=1, start=10))[1] == 5


def test_fingerprint_is_kept(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(10), IndexConfig())
    assert read_manifest(d).fingerprint == FP


def test_temporaries_of_a_killed_writer_are_collected_by_the_next_write(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(10), IndexConfig())
    litter = [".manifest.json.2v2av_gk.tmp", ".shard-000009-abcdef.parquet.k1.tmp", ".build.json.q.tmp"]
    for name in litter:
        (d / name).write_bytes(b"half written")
    (d / ".my-notes.tmp").write_text("not ours")
    add_to_index_dir(d, _vs(3, seed=1, start=10))
    names = {p.name for p in d.iterdir()}
    assert not set(litter) & names and ".my-notes.tmp" in names


def test_a_first_build_killed_while_marking_the_folder_can_be_built_again(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    (d / ".lock").write_text("")
    (d / "..retrieve-index.x9.tmp").write_text("half")  # killed inside the marker's atomic write
    build_index_dir(d, _vs(10), IndexConfig())
    assert read_manifest(d).count == 10 and not (d / "..retrieve-index.x9.tmp").exists()
