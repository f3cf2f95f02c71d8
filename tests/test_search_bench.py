"""benchmarks/search.py: its exact search and recall against independent computations, and a tiny run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import search as bench  # noqa: E402


def test_exact_topk_and_recall():
    x = bench.make_data(3000, 24, "clustered", seed=1)
    q = bench.make_data(300, 24, "clustered", seed=2)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    top = bench.exact_topk(x, q, 10)
    ref = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :10]
    assert np.mean(top == ref) > 0.99  # ties in float32 aside
    assert bench.recall(top, ref) > 0.99
    half = ref.copy()
    half[:, 5:] = -1  # five of ten found, the rest missing
    assert bench.recall(half, ref) == pytest.approx(0.5)


@pytest.mark.slow
def test_tiny_run_writes_table_and_json(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "search.py"), "--sizes", "2000", "--dims", "16"]
    cmd += ["--data", "clustered", "--methods", "sklearn,flat,ivf", "--budget", "300", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"sklearn", "flat", "ivf"}
    assert rows["flat"]["recall"] == 1.0 and rows["sklearn"]["recall"] == 1.0
    assert rows["flat"]["sgemm_gflops"] > 0 and rows["ivf"]["sweep"]
    assert "| 2,000 | 16 | clustered | flat |" in out.with_suffix(".md").read_text()
