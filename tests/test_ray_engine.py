"""`retrieve embed --engine ray` (a local Ray started here) against the in-process path, and
`index build --vectors FOLDER` over the shard folder it writes."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pandas as pd
import pytest

from indexer.shards import write_shard
from indexer.store import VectorSet, read_vectors
from tests.conftest import assert_one_line_error, run_cli

CNN5 = ["--encoder", "cnn5", "--image-size", "32", "--quiet", "--no-gpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'retrieve[ray]'); not in the test extra")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def data_with_bad_file(tmp_path, demo_data):
    """The demo data with one image damaged, so both engines must skip it with a reason."""
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    bad = sorted(root.rglob("*.png"))[0]
    bad.write_bytes(b"not a png at all")
    return root, bad


@pytest.mark.slow
def test_ray_engine_matches_in_process_embed(ray_local, tmp_path, capsys, data_with_bad_file):
    data, bad = data_with_bad_file
    code, _, err = run_cli(capsys, "embed", data, "--out", tmp_path / "local.parquet", *CNN5)
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "embed", data, "--out", tmp_path / "shards", "--engine", "ray", "--actors", "2", *CNN5
    )
    assert code == 0, err
    assert "skipped 1" in out and bad.name in err  # the damaged image, with its reason
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["part-00000.parquet"]

    local, remote = read_vectors(tmp_path / "local.parquet"), read_vectors(tmp_path / "shards")
    assert len(local) == len(remote) > 0
    assert remote.fingerprint == local.fingerprint
    assert bad.name not in " ".join(remote.rows["path"].astype(str))
    order = pd.Index(remote.rows["id"]).get_indexer(local.rows["id"])
    assert (order >= 0).all()  # the same ids
    np.testing.assert_allclose(remote.vectors[order], local.vectors, rtol=1e-5, atol=1e-6)
    for col in ("path", "label", "patient_id"):
        assert list(remote.rows[col].iloc[order].astype(str)) == list(local.rows[col].astype(str))

    code, _, err = run_cli(capsys, "index", "build", "--vectors", tmp_path / "shards", "--index", tmp_path / "idx")
    assert code == 0, err
    query = str(local.rows["path"].iat[0])
    code, out, err = run_cli(capsys, "query", query, "--index", tmp_path / "idx", "-k", "1", "--no-gpu")
    assert code == 0, err


def _shard(path, fingerprint, ids, dim=4, seed=0):
    rows = pd.DataFrame({"id": ids, "path": [f"img/{i}.png" for i in ids]})
    vecs = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    start = int(ids[0])
    write_shard(path, VectorSet(rows, vecs, fingerprint, {"name": fingerprint["encoder"]}), np.arange(start, start + 2))
    return vecs


FP_A = {"encoder": "a", "arch": {"type": "x"}, "weights_sha256": None, "dim": 4, "preprocess": {"image_size": 32}}


def test_vector_folder_concatenates_shards_of_one_encoder(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    v0 = _shard(folder / "part-00000.parquet", FP_A, [0, 1], seed=0)
    v1 = _shard(folder / "part-00001.parquet", FP_A, [2, 3], seed=1)
    vs = read_vectors(folder)
    assert list(vs.rows["id"]) == [0, 1, 2, 3] and "row_id" not in vs.rows.columns
    np.testing.assert_array_equal(vs.vectors, np.vstack([v0, v1]))
    code, _, err = run_cli(capsys, "index", "build", "--vectors", folder, "--index", tmp_path / "idx", "--no-gpu")
    assert code == 0, err


def test_vector_folder_of_two_encoders_is_refused(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    _shard(folder / "part-00000.parquet", FP_A, [0, 1])
    _shard(folder / "part-00001.parquet", {**FP_A, "encoder": "b", "arch": {"type": "y"}}, [2, 3])
    code, _, err = run_cli(capsys, "index", "build", "--vectors", folder, "--index", tmp_path / "idx")
    assert code == 2
    assert_one_line_error(err, "different encoders", "part-00001.parquet")
    assert not (tmp_path / "idx").exists()


def test_empty_vector_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "index", "build", "--vectors", tmp_path / "empty", "--index", tmp_path / "idx")
    assert code == 2
    assert_one_line_error(err, "without vector shards")


def test_ray_engine_without_ray_is_a_one_line_error(tmp_path, capsys, monkeypatch, demo_data):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, _, err = run_cli(capsys, "embed", demo_data, "--out", tmp_path / "shards", "--engine", "ray", *CNN5)
    assert code == 2
    assert_one_line_error(err, "pip install 'retrieve[ray]'")
    assert not (tmp_path / "shards").exists()


def test_unknown_engine_is_a_one_line_error(tmp_path, capsys, demo_data):
    code, _, err = run_cli(capsys, "embed", demo_data, "--out", tmp_path / "v.parquet", "--engine", "spark", *CNN5)
    assert code == 2
    assert_one_line_error(err, "--engine spark")


@pytest.mark.slow
def test_ray_engine_refuses_an_out_folder_that_is_not_empty(tmp_path, capsys, demo_data):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'retrieve[ray]')")
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "embed", demo_data, "--out", out, "--engine", "ray", *CNN5)
    assert code == 2
    assert_one_line_error(err, "not an empty folder")
    assert (out / "keep.txt").read_text() == "mine"
