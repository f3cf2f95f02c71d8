"""`suggest-labels` on a large generated index: wall time and peak memory of `suggest_labels` per strategy.

    OMP_NUM_THREADS=1 python benchmarks/suggest_scale.py --rows 200000 --dim 256 --labelled 5000 --out suggest.json

N unit vectors of d dims around 50 centres, L of them labelled (two classes), a budget of 50 spread over k-means
clusters (the default `--spread kmeans`). Each strategy runs in a fresh process, so its peak RSS is its own;
`random` (no scoring, only the k-means spread) is the bare baseline measured in the same run. Before session 9
the kNN vote held an N x L float64 similarity matrix (8 GB at 200,000 x 5,000) and sorted its rows whole.
Prints a markdown table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(rows: int, dim: int, labelled: int, strategy: str, budget: int) -> dict:
    """One strategy in this process: seconds of suggest_labels and the process's peak RSS."""
    import numpy as np
    import pandas as pd

    from retrieval.training.active import suggest_labels

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, dim)).astype(np.float32)
    which = rng.integers(0, 50, rows)
    v = centres[which] + rng.normal(size=(rows, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    labels = pd.array([None] * rows, dtype="string")
    chosen = rng.choice(rows, labelled, replace=False)
    labels[chosen] = np.where(which[chosen] % 2 == 0, "a", "b")
    table = pd.DataFrame({"path": [f"p{i}.png" for i in range(rows)], "label": labels})
    t0 = time.perf_counter()
    out = suggest_labels(table, v, budget, strategy, spread="kmeans")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows, "dim": dim, "labelled": labelled, "strategy": strategy, "picked": len(out),
        "seconds": round(seconds, 1), "peak_rss_mb": round(peak),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--labelled", type=int, default=5_000)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--strategies", default="random,entropy,esd")
    ap.add_argument("--out", type=Path, default=Path("suggest_scale.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one strategy here and print its row as JSON
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.rows, args.dim, args.labelled, args.one, args.budget)))
        return 0
    results = []
    for strategy in args.strategies.split(","):
        cmd = [sys.executable, __file__, "--rows", str(args.rows), "--dim", str(args.dim)]
        cmd += ["--labelled", str(args.labelled), "--budget", str(args.budget), "--one", strategy]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| rows | dim | labelled | strategy (+kmeans) | seconds | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r['rows']:,}", r["dim"], f"{r['labelled']:,}", r["strategy"], r["seconds"], r["peak_rss_mb"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
