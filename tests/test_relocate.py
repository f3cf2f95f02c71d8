"""Relocatable indexes: paths relative to a recorded data root; data and index moved together or apart."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from dicom_factory import make_pacs_tree

from indexer.index_dir import open_index_dir, read_manifest
from retrieval.errors import RetrieveError
from retrieval.relocate import relocate_index, resolve_data_root

ENC = ["--encoder", "intensity-stats", "--image-size", "48", "--quiet"]
QUERY = "PAT002/STUDY1/SERIES1/IM0002"


@pytest.fixture
def moved(tmp_path):
    """A folder holding a PACS tree and its index, built in place."""
    from retrieval.cli.main import main

    home = tmp_path / "site"
    make_pacs_tree(home / "pacs")
    assert main(["index", "build", str(home / "pacs"), "--index", str(home / "idx"), *ENC]) == 0
    return home


def _query(index, image, **kw):
    from retrieval.pipeline import encoder_for_index, query_files

    m = read_manifest(index)
    loaded = encoder_for_index(m.fingerprint, m.encoder_spec, "test")
    results, errors = query_files(open_index_dir(index, use_gpu=False), loaded, [str(image)], 4, **kw)
    assert not errors
    return results[0]


@pytest.mark.slow
def test_manifest_records_the_root_and_rows_relative_paths(moved):
    m = read_manifest(moved / "idx")
    assert m.data_root == str((moved / "pacs").resolve()) and m.data_root_from_index == "../pacs"
    rows = open_index_dir(moved / "idx", use_gpu=False).rows
    assert rows["rel_path"].notna().all() and not rows["rel_path"].str.startswith("/").any()
    assert (rows["rel_path"] == rows["id"].str.replace(r"#\d+$", "", regex=True)).all()


def test_data_and_index_moved_together_keep_working(moved, tmp_path):
    before = _query(moved / "idx", moved / "pacs" / QUERY)
    dest = tmp_path / "elsewhere" / "site2"
    dest.parent.mkdir()
    shutil.move(str(moved), str(dest))
    assert not moved.exists()
    after = _query(dest / "idx", dest / "pacs" / QUERY)
    assert after.rows["id"].tolist() == before.rows["id"].tolist()
    assert np.allclose([h.score for h in after.hits], [h.score for h in before.hits])
    for p in after.rows["path"]:
        assert p.startswith(str(dest.resolve() / "pacs")) and os.path.isfile(p)
    # the query image itself (in the index) is still left out after the move
    assert str((dest / "pacs" / QUERY).resolve()) not in after.rows["path"].tolist()


@pytest.mark.slow
def test_data_moved_alone_needs_data_root_or_relocate(moved, tmp_path, caplog):
    new_home = tmp_path / "nas" / "archive"
    new_home.parent.mkdir()
    shutil.move(str(moved / "pacs"), str(new_home))
    idx = open_index_dir(moved / "idx", use_gpu=False)
    with caplog.at_level("WARNING"):
        assert resolve_data_root(idx) == (moved / "pacs").resolve()  # recorded, no longer there
    assert "no longer holds the indexed files" in caplog.text
    res = _query(moved / "idx", new_home / QUERY, data_root=new_home)
    assert all(p.startswith(str(new_home.resolve())) for p in res.rows["path"])
    assert str((new_home / QUERY).resolve()) not in res.rows["path"].tolist()  # still not its own neighbour
    with pytest.raises(RetrieveError, match="does not hold the indexed files"):
        _query(moved / "idx", new_home / QUERY, data_root=tmp_path)
    with pytest.raises(RetrieveError, match="no such folder"):
        resolve_data_root(idx, tmp_path / "missing")
    gen = read_manifest(moved / "idx").generation
    with pytest.raises(RetrieveError, match="does not hold"):
        relocate_index(moved / "idx", tmp_path)
    old, new = relocate_index(moved / "idx", new_home)
    assert old == str((moved / "pacs").resolve()) and new == new_home.resolve()
    m = read_manifest(moved / "idx")
    assert m.data_root == str(new_home.resolve()) and m.generation == gen and m.count == 24
    res = _query(moved / "idx", new_home / QUERY)
    assert all(p.startswith(str(new_home.resolve())) for p in res.rows["path"])


def test_old_index_with_absolute_paths_keeps_working(tmp_path):
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet
    from retrieval.pipeline import query_vectors

    v = np.eye(4, dtype=np.float32)
    rows = pd.DataFrame(
        {
            "id": [f"{j}.png" for j in range(4)],
            "path": [f"/old/place/{j}.png" for j in range(4)],
            "label": list("abab"),
            "patient_id": list("pqrs"),
            "frame_index": pd.array([None] * 4, dtype="Int64"),
        }
    )
    fp = {"encoder": "toy", "dim": 4, "preprocess": {}}
    build_index_dir(tmp_path / "old", VectorSet(rows, v, fp, {"name": "toy"}), IndexConfig(kind="flat", gpu=False))
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest.pop("data_root", None), manifest.pop("data_root_from_index", None)  # as an older version wrote it
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    idx = open_index_dir(tmp_path / "old", use_gpu=False)
    assert resolve_data_root(idx) is None
    (res,) = query_vectors(idx, ["q"], v[:1], 2)
    assert res.rows["path"].tolist() == ["/old/place/0.png", "/old/place/1.png"]
    with pytest.raises(RetrieveError, match="absolute paths"):
        relocate_index(tmp_path / "old", tmp_path)


@pytest.mark.slow
def test_added_images_are_relocatable_too(moved, tmp_path, capsys):
    from conftest import run_cli
    from dicom_factory import make_dicom

    make_dicom(moved / "pacs" / "PAT009" / "ST" / "SE" / "IM0001", np.full((48, 48), 900, np.uint16), "PAT009")
    code, out, err = run_cli(capsys, "index", "add", moved / "pacs" / "PAT009", "--index", moved / "idx", "--quiet")
    assert code == 0, err
    rows = open_index_dir(moved / "idx", use_gpu=False).rows
    # relative to the index's data root, not to the folder that was added
    added = rows["patient_id"].astype("string").eq("PAT009").fillna(False).to_numpy(dtype=bool)
    assert rows.loc[added, "rel_path"].tolist() == ["PAT009/ST/SE/IM0001"]
    dest = tmp_path / "moved"
    shutil.move(str(moved), str(dest))
    res = _query(dest / "idx", dest / "pacs" / QUERY)
    assert all(os.path.isfile(p) for p in res.rows["path"])


def test_relocate_waits_for_the_write_lock(moved, monkeypatch):
    from indexer.errors import IndexBusyError
    from indexer.index_dir import write_lock

    monkeypatch.setenv("RETRIEVE_LOCK_TIMEOUT", "0.2")
    before = (moved / "idx" / "manifest.json").read_bytes()
    with write_lock(moved / "idx"):
        with pytest.raises(IndexBusyError, match="another process"):
            relocate_index(moved / "idx", moved / "pacs")
    assert (moved / "idx" / "manifest.json").read_bytes() == before  # nothing written while another writer held it


@pytest.mark.slow
def test_cli_data_root_and_relocate(moved, tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    new_home = tmp_path / "nas"
    shutil.move(str(moved / "pacs"), str(new_home))
    q = new_home / QUERY
    code, out, err = run_cli(
        capsys, "query", q, "--index", moved / "idx", "--k", "2", "--data-root", tmp_path, "--json"
    )
    assert code == 2
    assert_one_line_error(err, "--data-root", "does not hold the indexed files")
    code, out, err = run_cli(
        capsys, "query", q, "--index", moved / "idx", "--k", "2", "--data-root", new_home, "--json"
    )
    assert code == 0, err
    assert all(os.path.isfile(r["path"]) for r in json.loads(out)["results"])
    code, out, err = run_cli(capsys, "index", "relocate", "--index", moved / "idx", "--data-root", tmp_path)
    assert code == 2
    assert_one_line_error(err, "does not hold")
    code, out, err = run_cli(capsys, "index", "relocate", "--index", moved / "idx", "--data-root", new_home)
    assert code == 0, err
    assert str(new_home.resolve()) in out
    code, out, err = run_cli(capsys, "query", q, "--index", moved / "idx", "--k", "2", "--json")
    assert code == 0, err
    assert all(os.path.isfile(r["path"]) for r in json.loads(out)["results"])


def _rows(index):
    return open_index_dir(index, use_gpu=False).rows


def _add(capsys, data, index, *extra):
    from conftest import run_cli

    code, out, err = run_cli(capsys, "index", "add", data, "--index", index, "--quiet", *extra)
    assert code == 0, err
    return out, err


def _assert_clean(rows, ids):
    """No image twice, and every row named as a build names it: rel_path (+ #frame), or its absolute path."""
    assert rows["id"].tolist() == ids
    assert not rows["id"].duplicated().any()
    assert (
        not rows.loc[rows["rel_path"].notna(), "rel_path"]
        .astype(str)
        .add("#" + rows["frame_index"].astype("string").fillna(""))
        .duplicated()
        .any()
    )
    inside = rows["rel_path"].notna().to_numpy()
    assert (rows.loc[inside, "rel_path"] == rows.loc[inside, "id"].str.replace(r"#\d+$", "", regex=True)).all()
    assert (rows.loc[~inside, "id"].str.replace(r"#\d+$", "", regex=True) == rows.loc[~inside, "path"]).all()


def test_add_after_moving_index_and_data_together_knows_every_image(moved, tmp_path, capsys):
    """The session 9 bug: after `cp -r site site2`, `index add site2/pacs` re-added every image under
    absolute-path ids (duplicates). Now: nothing added, by the whole root, a sub-folder or --replace."""
    from dicom_factory import make_dicom

    ids = _rows(moved / "idx")["id"].tolist()
    site2 = tmp_path / "elsewhere" / "site2"
    shutil.copytree(moved, site2)
    out, _ = _add(capsys, site2 / "pacs", site2 / "idx")
    assert f"added 0 images ({len(ids)} already indexed); index now holds {len(ids)}" in out
    out, _ = _add(capsys, site2 / "pacs" / "PAT001", site2 / "idx")  # a sub-folder: ids relative to it
    assert "added 0 images" in out and f"now holds {len(ids)}" in out
    _assert_clean(_rows(site2 / "idx"), ids)
    gen = read_manifest(site2 / "idx").generation
    out, _ = _add(capsys, site2 / "pacs" / "PAT002", site2 / "idx", "--replace")  # re-embedded in their place
    assert f"now holds {len(ids)}" in out and read_manifest(site2 / "idx").generation == gen + 1
    rows = _rows(site2 / "idx")
    assert sorted(rows["id"]) == sorted(ids) and not rows["id"].duplicated().any()
    pat2 = rows["id"].str.startswith("PAT002/").to_numpy()
    assert pat2.any() and (rows.loc[pat2, "path"].str.startswith(str(site2.resolve()))).all()
    # a genuinely new image, in a new sub-folder: added once, named relative to the data root
    make_dicom(site2 / "pacs" / "PAT009" / "ST" / "SE" / "IM0001", np.full((48, 48), 900, np.uint16), "PAT009")
    out, _ = _add(capsys, site2 / "pacs" / "PAT009" / "ST", site2 / "idx")
    assert f"added 1 images (0 already indexed); index now holds {len(ids) + 1}" in out
    out, _ = _add(capsys, site2 / "pacs", site2 / "idx")
    assert f"added 0 images ({len(ids) + 1} already indexed)" in out
    rows = _rows(site2 / "idx")
    assert rows["id"].iloc[-1] == "PAT009/ST/SE/IM0001" and rows["rel_path"].iloc[-1] == "PAT009/ST/SE/IM0001"
    _assert_clean(rows.sort_values("id"), sorted(rows["id"]))
    # the original, where it was, is untouched
    assert _rows(moved / "idx")["id"].tolist() == ids


def test_add_outside_the_data_root_keeps_absolute_paths(moved, tmp_path, capsys):
    from dicom_factory import make_dicom

    n = read_manifest(moved / "idx").count
    other = make_dicom(tmp_path / "other" / "PAT001" / "IM0001", np.full((48, 48), 300, np.uint16), "PAT777")
    out, _ = _add(capsys, tmp_path / "other", moved / "idx")
    assert f"added 1 images (0 already indexed); index now holds {n + 1}" in out
    for folder in (tmp_path / "other", tmp_path / "other" / "PAT001"):
        out, _ = _add(capsys, folder, moved / "idx")
        assert f"added 0 images (1 already indexed); index now holds {n + 1}" in out
    rows = _rows(moved / "idx")
    last = rows.iloc[-1]
    assert last["id"] == last["path"] == str(other.resolve()) and pd.isna(last["rel_path"])
    _assert_clean(rows, rows["id"].tolist())


@pytest.mark.slow
def test_add_after_moving_index_or_data_apart_knows_every_image(moved, tmp_path, capsys, caplog):
    ids = _rows(moved / "idx")["id"].tolist()
    n = len(ids)
    # the index moved, the data not: found by the recorded absolute root, relocated or not
    alone = tmp_path / "alone" / "idx"
    shutil.copytree(moved / "idx", alone)
    (alone.parent / "pacs").mkdir()  # a folder where the relative root points, without the files
    out, _ = _add(capsys, moved / "pacs", alone)
    assert f"added 0 images ({n} already indexed)" in out
    relocate_index(alone, moved / "pacs")
    out, _ = _add(capsys, moved / "pacs" / "PAT003", alone)
    assert "added 0 images" in out and f"now holds {n}" in out
    _assert_clean(_rows(alone), ids)
    # the data moved, `index relocate --data-root` first
    nas = tmp_path / "nas" / "archive"
    shutil.copytree(moved / "pacs", nas)
    shutil.move(str(moved / "pacs"), str(tmp_path / "gone"))
    relocate_index(moved / "idx", nas)
    out, _ = _add(capsys, nas, moved / "idx")
    assert f"added 0 images ({n} already indexed)" in out
    # the data moved without a relocate: the folder holding the indexed files stands in, with a warning
    stale = tmp_path / "stale"
    shutil.copytree(moved / "idx", stale)
    relocate_index(stale, tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    with caplog.at_level("WARNING"):
        out, err = _add(capsys, nas / "PAT002" / "STUDY1", stale)
    assert "added 0 images" in out and f"now holds {n}" in out
    assert "no longer holds the indexed files" in caplog.text and "index relocate" in caplog.text
    _assert_clean(_rows(stale), ids)


def test_add_keys_on_rel_path_not_on_stale_stored_paths(tmp_path):
    """add_to_index_dir: rows with a rel_path are known by it (their stored absolute path is where they
    were); rows without one by their absolute path, which also finds an old row stored outside the root."""
    from indexer.config import IndexConfig
    from indexer.index_dir import add_to_index_dir, build_index_dir
    from indexer.store import VectorSet

    fp = {"encoder": "toy", "dim": 4, "preprocess": {}}

    def vs(ids, paths, rels, seed=0):
        rows = pd.DataFrame(
            {
                "id": ids,
                "path": paths,
                "rel_path": pd.array(rels, dtype="string"),
                "label": ["a"] * len(ids),
                "frame_index": pd.array([None] * len(ids), dtype="Int64"),
            }
        )
        v = np.random.default_rng(seed).normal(size=(len(ids), 4)).astype(np.float32)
        return VectorSet(rows, v / np.linalg.norm(v, axis=1, keepdims=True), fp, {"name": "toy"})

    d = tmp_path / "idx"
    build_index_dir(
        d, vs(["x/a.png", "/out/o.png"], ["/old/x/a.png", "/out/o.png"], ["x/a.png", None]), IndexConfig(gpu=False)
    )
    new = vs(
        ["x/a.png", "o.png", "/old/x/a.png", "x/b.png"],
        ["/new/x/a.png", "/out/o.png", "/old/x/a.png", "/new/x/b.png"],
        ["x/a.png", "o.png", None, "x/b.png"],  # moved; the old outside row now under the root; a copy left behind
        seed=1,
    )
    m, added = add_to_index_dir(d, new)
    assert added == 2 and m.count == 4
    rows = _rows(d)
    assert rows["path"].tolist()[2:] == ["/old/x/a.png", "/new/x/b.png"]
    m, added = add_to_index_dir(d, vs(["x/a.png", "o.png"], ["/new/x/a.png", "/out/o.png"], ["x/a.png", "o.png"]), True)
    assert added == 2 and m.count == 4  # replaced, not duplicated
    rows = _rows(d)
    assert sorted(rows["path"]) == ["/new/x/a.png", "/new/x/b.png", "/old/x/a.png", "/out/o.png"]
    # rows without a rel_path column (callers that know no root): by the stored path, as before
    plain = vs(["q"], ["/new/x/b.png"], [None])
    plain.rows = plain.rows.drop(columns=["rel_path"])
    assert add_to_index_dir(d, plain)[1] == 0


def test_replace_from_a_class_sub_folder_keeps_the_labels(tmp_path, capsys):
    """`index add DATA/severe --replace` re-embeds those images from a folder that names no class: the replaced
    rows keep their labels (an upsert of vectors must not erase what a person labelled); new images stay
    unlabelled, and a source that does carry labels still sets them."""
    from conftest import run_cli, write_png

    rng = np.random.default_rng(0)
    for label in ("mild", "severe"):
        for i in range(3):
            write_png(tmp_path / "data" / label / f"{label}{i}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    code, _, err = run_cli(capsys, "index", "build", tmp_path / "data", "--index", tmp_path / "idx", *ENC)
    assert code == 0, err
    before = _rows(tmp_path / "idx").set_index("id")["label"].to_dict()
    write_png(tmp_path / "data" / "severe" / "severe9.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    _add(capsys, tmp_path / "data" / "severe", tmp_path / "idx", "--replace")
    after = _rows(tmp_path / "idx").set_index("id")["label"]
    assert {k: after[k] for k in before} == before  # severe0-2 re-embedded, still 'severe'
    assert pd.isna(after["severe/severe9.png"])  # new, from a folder without classes: no label
    _add(capsys, tmp_path / "data", tmp_path / "idx", "--replace")  # from the root: the class folders label it
    assert _rows(tmp_path / "idx").set_index("id")["label"]["severe/severe9.png"] == "severe"
