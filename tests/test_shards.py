"""Sharded store: stable row ids, append-only adds, lazy row reads, remove / upsert / compact for every kind."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from test_index import _vs

from indexer import shards as shards_module
from indexer.config import IndexConfig
from indexer.index_dir import (
    add_to_index_dir,
    build_index_dir,
    compact_index_dir,
    open_index_dir,
    read_manifest,
    remove_from_index_dir,
    verify_index_dir,
)
from indexer.search import filter_mask, search
from retrieval.errors import RetrieveError

KINDS = ["flat", "hnsw", "ivf", "ivfpq"]


def _exact_ids(idx, q, allowed=None, k=10):
    vs = idx.vectors
    sims = vs.vectors @ q
    if allowed is not None:
        sims = np.where(allowed, sims, -np.inf)
    return [int(idx.live_ids[j]) for j in np.argsort(-sims, kind="stable")[:k]]


def test_shards_are_plain_parquet_with_row_ids(tmp_path, monkeypatch):
    monkeypatch.setattr("indexer.index_dir.SHARD_ROWS", 120)
    d = tmp_path / "idx"
    m = build_index_dir(d, _vs(300), IndexConfig(kind="flat"))
    assert [s["rows"] for s in m.shards] == [120, 120, 60] and m.next_id == 300
    table = pq.read_table(d / m.shards[1]["name"])  # readable as it is by any Parquet reader
    assert table.column("row_id").to_pylist() == list(range(120, 240))
    assert table.schema.field("vector").type.list_size == 16


def test_add_appends_a_shard_and_never_rewrites_the_old_ones(tmp_path):
    d = tmp_path / "idx"
    m1 = build_index_dir(d, _vs(50), IndexConfig(kind="flat"))
    first = (d / m1.shards[0]["name"]).read_bytes()
    m2, added = add_to_index_dir(d, _vs(20, seed=1, start=50))
    assert added == 20 and [s["name"] for s in m2.shards][0] == m1.shards[0]["name"]
    assert (d / m1.shards[0]["name"]).read_bytes() == first
    assert m2.shards[1]["id_min"] == 50 and m2.shards[1]["id_max"] == 69


def test_fetch_reads_only_the_row_groups_of_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "ROW_GROUP", 64)
    d = tmp_path / "idx"
    build_index_dir(d, _vs(1000), IndexConfig(kind="flat"))
    idx = open_index_dir(d, use_gpu=False)
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or original(self, i, **kw)
    )
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("read the whole shard"))
    rows = idx.fetch([700, 3, 701])
    assert rows["id"].tolist() == ["img700.png", "img3.png", "img701.png"]
    assert sorted(set(reads)) == [0, 10]


@pytest.mark.parametrize("kind", KINDS)
def test_remove_by_patient_then_search_never_returns_it(tmp_path, kind):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(600), IndexConfig(kind=kind))
    m, removed = remove_from_index_dir(
        d, lambda idx: idx.read_columns(["patient_id"])["patient_id"].eq("p3").to_numpy()
    )
    assert removed == 5 and m.count == 595 and verify_index_dir(d) == []
    idx = open_index_dir(d, use_gpu=False)
    assert len(idx.rows) == 595 and not idx.rows["patient_id"].eq("p3").any()
    gone = set(range(15, 20))  # p3's row ids
    full = _vs(600).vectors
    for q in full[[15, 16, 17]]:
        hits = search(idx, q[None], 10)[0]
        assert len(hits) == 10 and not gone & {h.row_id for h in hits}
        assert all(idx.rows["id"].iloc[h.position] == f"img{h.row_id}.png" for h in hits)
    if kind == "flat":
        assert [h.row_id for h in search(idx, full[[15]], 10)[0]] == _exact_ids(idx, full[15])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_compact_drops_removed_rows_and_keeps_ids(tmp_path, kind):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(200), IndexConfig(kind=kind))
    add_to_index_dir(d, _vs(50, seed=2, start=200))
    remove_from_index_dir(d, lambda idx: (idx.live_ids % 10) == 0)
    before = open_index_dir(d, use_gpu=False)
    m, dropped = compact_index_dir(d)
    assert dropped == 25 and m.removed == [] and len(m.shards) == 1 and m.count == 225
    after = open_index_dir(d, use_gpu=False)
    assert list(after.live_ids) == list(before.live_ids) and after.index.ntotal == 225
    assert after.rows["id"].tolist() == before.rows["id"].tolist()
    q = _vs(250).vectors[7]
    assert [h.row_id for h in search(after, q[None], 5)[0]] == [h.row_id for h in search(before, q[None], 5)[0]]
    m2, _ = add_to_index_dir(d, _vs(3, seed=3, start=900))
    assert m2.shards[-1]["id_min"] == 250  # ids are never reused


def test_replace_upserts_re_embedded_images(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(40), IndexConfig(kind="flat"))
    again = _vs(5, seed=9, start=10)  # the same paths, new vectors
    m, added = add_to_index_dir(d, again)
    assert added == 0
    m, added = add_to_index_dir(d, again, replace=True)
    assert added == 5 and m.count == 40 and verify_index_dir(d) == []
    idx = open_index_dir(d, use_gpu=False)
    assert sorted(idx.rows["id"]) == sorted(f"img{j}.png" for j in range(40))
    hit = search(idx, again.vectors[:1], 1)[0][0]
    assert hit.row_id >= 40 and idx.fetch([hit.row_id])["id"].tolist() == ["img10.png"]
    assert sum(m.labels.values()) == 40


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_filters_run_inside_faiss_and_return_exactly_k(tmp_path, kind):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(900), IndexConfig(kind=kind))
    idx = open_index_dir(d, use_gpu=False)
    allowed = filter_mask(idx, ["p0", "p1"], [("label", "b")])
    q = _vs(900).vectors[4]
    hits = search(idx, q[None], 10, allowed)[0]
    assert len(hits) == 10 and all(allowed[h.position] for h in hits)
    if kind == "flat":
        assert [h.row_id for h in hits] == _exact_ids(idx, q, allowed)


def test_remove_that_matches_nothing_leaves_the_index_as_it_was(tmp_path, capsys):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(30), IndexConfig(kind="flat"))
    before = read_manifest(d)
    with pytest.raises(RetrieveError, match="nothing matches"):
        remove_from_index_dir(d, lambda idx: np.zeros(idx.count, dtype=bool))
    assert read_manifest(d) == before
    code, _, err = run_cli(capsys, "index", "remove", "--index", d, "--patient", "nobody")
    assert code == 2 and "nothing matches" in err


def test_cli_remove_compact_and_info(tmp_path, capsys):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(60), IndexConfig(kind="hnsw"))
    code, out, err = run_cli(capsys, "index", "remove", "--index", d, "--where", "label=a", "--id", "img1.png")
    assert code == 0, err
    assert "removed 21 images; index now holds 39" in out and "compact" in out
    code, out, _ = run_cli(capsys, "index", "compact", "--index", d)
    assert code == 0 and "dropped 21 removed rows; 39 images" in out
    assert run_cli(capsys, "index", "verify", "--index", d)[0] == 0
    code, _, err = run_cli(capsys, "index", "remove", "--index", d, "--where", "colour=red")
    assert code == 2 and "unknown column 'colour'" in err


@pytest.mark.slow
def test_filtered_search_survives_faiss_torch_utils(tmp_path):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search process-wide."""
    import subprocess
    import sys

    d = tmp_path / "idx"
    build_index_dir(d, _vs(50), IndexConfig(kind="flat"))
    code = (
        "import faiss.contrib.torch_utils\n"
        "from indexer.index_dir import open_index_dir\n"
        "from indexer.search import filter_mask, search\n"
        f"idx = open_index_dir({str(d)!r}, use_gpu=False)\n"
        "hits = search(idx, idx.vectors.vectors[:1], 5, filter_mask(idx, ['p0']))[0]\n"
        "assert len(hits) == 5 and all(h.row_id >= 5 for h in hits)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compact_of_an_ivf_with_every_row_removed_says_what_to_do(tmp_path):
    d = tmp_path / "idx"
    build_index_dir(d, _vs(300), IndexConfig(kind="ivf"))
    remove_from_index_dir(d, lambda idx: idx.live_ids >= 0)
    before = (d / "manifest.json").read_bytes()
    with pytest.raises(RetrieveError, match="every row is removed.*--overwrite"):
        compact_index_dir(d)
    assert (d / "manifest.json").read_bytes() == before and verify_index_dir(d) == []
