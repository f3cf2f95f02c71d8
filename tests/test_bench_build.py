"""benchmarks/bench_build.py: its cell syntax, generated shard folder, overhead arithmetic, and one tiny build."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_build as bench  # noqa: E402

from indexer.store import read_vectors  # noqa: E402


def test_parse_cells():
    cells = bench.parse_cells("1e5x256:flat,auto; 1000000x256:auto:stream;", ["cli"])
    assert cells == [(100000, 256, ["flat", "auto"], ["cli"]), (1000000, 256, ["auto"], ["stream"])]
    with pytest.raises(SystemExit):
        bench.parse_cells("100000:flat")


def test_write_folder_is_a_readable_shard_folder(tmp_path):
    written = bench.write_folder(tmp_path / "v", 2500, 16, shard=1000)
    files = sorted((tmp_path / "v").glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert written == sum(f.stat().st_size for f in files)
    vs = read_vectors(tmp_path / "v")  # the reader of `index build --vectors FOLDER`
    assert len(vs) == 2500 and vs.dim == 16 and vs.fingerprint["dim"] == 16
    assert np.allclose(np.linalg.norm(vs.vectors, axis=1), 1, atol=1e-5)
    assert vs.rows["id"].iloc[1234] == "case0001234.png"
    # clustered: each vector's nearest other vector is far closer than two random unit vectors would be
    sims = vs.vectors[:200] @ vs.vectors.T
    sims[np.arange(200), np.arange(200)] = -1
    assert np.median(sims.max(axis=1)) > 0.5


def test_overheads_against_the_smallest_n():
    rows = [
        {"n": 1000, "d": 8, "method": "cli", "kind": "flat", "peak_mb": 500.0, "index_mb": 10.0},
        {"n": 100, "d": 8, "method": "cli", "kind": "flat", "peak_mb": 450.0, "index_mb": 1.0},
        {"n": 1000, "d": 8, "method": "stream", "kind": "flat", "peak_mb": 300.0, "index_mb": 10.0},
        {"n": 100, "d": 8, "method": "cli", "kind": "hnsw", "skipped": "over 5 s"},
        {"n": 2000, "d": 16, "method": "cli", "kind": "flat", "peak_mb": 600.0, "index_mb": 40.0},
    ]
    bench.add_overheads(rows)
    assert rows[0]["overhead_mb"] == 490.0 and rows[1]["overhead_mb"] == 449.0
    assert rows[0]["overhead_growth_mb"] == 41.0 and rows[0]["growth_vs"] == "100x8"
    assert rows[1]["overhead_growth_mb"] == 0.0
    assert rows[2]["overhead_growth_mb"] == 0.0 and rows[2]["growth_vs"] == "1000x8"  # its own smallest N
    assert "overhead_mb" not in rows[3]
    assert rows[4]["overhead_growth_mb"] == 0.0  # another d: its own baseline
    for r in rows[:3] + rows[4:]:
        r.update(vectors_mb=0.0, factory="Flat", wall_s=1.0, cpu_s=1.0)
    rows[3]["vectors_mb"] = 0.0
    md = bench.table(rows)
    assert "| 1,000 | 8 | 0 | cli | flat | Flat |" in md and "| +41 (vs 100x8) |" in md
    assert "not run: over 5 s" in md


@pytest.mark.slow
def test_tiny_run_measures_a_streaming_build(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["--cells", "3000x16:flat,ivf:stream", "--work", str(tmp_path), "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["kind"]: r for r in report["rows"]}
    assert set(rows) == {"flat", "ivf"}
    flat = rows["flat"]
    assert flat["factory"] == "Flat" and flat["shards"] == 1
    assert flat["index_mb"] * 2**20 >= 3000 * 16 * 4  # the flat index holds every vector
    assert flat["peak_mb"] > flat["index_mb"] and flat["overhead_mb"] == flat["peak_mb"] - flat["index_mb"]
    assert rows["ivf"]["factory"].startswith("IVF")
    assert "| 3,000 | 16 |" in out.with_suffix(".md").read_text()
    assert not list(tmp_path.glob("bench-build-*"))  # the vectors and indexes are removed
