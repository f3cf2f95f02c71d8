"""indexer.streaming.build_from_vectors: `index build --vectors FOLDER` a chunk at a time, same index as the
whole-store build, one-line errors and nothing written for bad input."""

import numpy as np
import pandas as pd
import pytest

import indexer.streaming as streaming
from indexer.config import IndexConfig
from indexer.index_dir import build_index_dir, open_index_dir, read_manifest
from indexer.search import search
from indexer.shards import write_shard
from indexer.store import VectorSet, read_vectors, write_vectors
from retrieval.errors import RetrieveError


def _vs(start: int, n: int, d: int = 12, arch: str = "a") -> VectorSet:
    rng = np.random.default_rng(start)
    v = rng.standard_normal((n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    j = np.arange(start, start + n)
    rows = pd.DataFrame(
        {
            "id": [f"img{i}.png" for i in j],
            "path": [f"a/img{i}.png" for i in j],
            "label": [None if i % 7 == 0 else "xyz"[i % 3] for i in j],
            "frame_index": pd.array([None if i % 2 else int(i) for i in j], dtype="Int64"),
        }
    )
    return VectorSet(rows, v, {"arch": arch, "dim": d}, {"name": arch})


def _folder(tmp_path, sizes=(30, 45, 25), arch_of_last="a"):
    folder = tmp_path / "vectors"
    folder.mkdir()
    start = 0
    for k, n in enumerate(sizes):
        arch = arch_of_last if k == len(sizes) - 1 else "a"
        write_shard(folder / f"part-{k:05d}.parquet", _vs(start, n, arch=arch), np.arange(start, start + n))
        start += n
    return folder


def test_same_index_as_the_whole_store_build(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 4 * 12 * 16)  # 16 rows a chunk: several parts per file
    folder = _folder(tmp_path)
    m = streaming.build_from_vectors(tmp_path / "stream", folder, IndexConfig(kind="flat", gpu=False))
    build_index_dir(tmp_path / "whole", read_vectors(folder), IndexConfig(kind="flat", gpu=False))
    whole = open_index_dir(tmp_path / "whole", use_gpu=False)
    got = open_index_dir(tmp_path / "stream", use_gpu=False)
    assert m.count == 100 and len(m.shards) == 2 + 3 + 2  # 30, 45, 25 rows in chunks of 16
    labels = read_manifest(tmp_path / "stream").labels
    assert labels == whole.manifest.labels and labels["(unlabelled)"] == 15 and sum(labels.values()) == 100
    cols = ["id", "path", "label", "frame_index"]
    pd.testing.assert_frame_equal(got.rows[cols], whole.rows[cols])
    assert np.array_equal(got.vectors.vectors, whole.vectors.vectors)
    q = whole.vectors.vectors[[3, 50, 99]]
    for a, b in zip(search(got, q, 5), search(whole, q, 5)):
        assert [h.row_id for h in a] == [h.row_id for h in b]
        assert a[0].row_id in (3, 50, 99)  # each vector finds itself first


def test_ivf_trains_on_a_sample_and_a_single_file_works(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "TRAIN_SAMPLE", 200)
    seen = []
    real = streaming.StreamingBuild._train_sample
    monkeypatch.setattr(
        streaming.StreamingBuild, "_train_sample", lambda self, r, n: seen.append(len(x := real(self, r, n))) or x
    )
    path = write_vectors(tmp_path / "v.parquet", _vs(0, 800))
    m = streaming.build_from_vectors(tmp_path / "idx", path, IndexConfig(kind="ivf", ivf_nlist=4, gpu=False))
    assert m.count == 800 and m.kind == "ivf" and seen == [200]
    idx = open_index_dir(tmp_path / "idx", use_gpu=False)
    assert idx.rows["id"].tolist() == [f"img{i}.png" for i in range(800)]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: _folder(tmp, arch_of_last="b"), "shards from different encoders"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "folder without vector shards"),
        (lambda tmp: tmp / "nothing.parquet", "vectors file not found"),
        (lambda tmp: (tmp / "bad.parquet").write_text("not parquet") and tmp / "bad.parquet", "not a readable Parquet"),
    ],
)
def test_bad_input_is_one_error_and_nothing_written(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(RetrieveError, match=message):
        streaming.build_from_vectors(tmp_path / "idx", source, IndexConfig(kind="flat", gpu=False))
    assert not (tmp_path / "idx").exists()


def test_a_file_without_fingerprint_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "path": ["a"], "vector": [[0.1, 0.2]]}), tmp_path / "plain.parquet")
    with pytest.raises(RetrieveError, match="not a vectors file"):
        streaming.build_from_vectors(tmp_path / "idx", tmp_path / "plain.parquet", IndexConfig(gpu=False))
