"""A writer process for the reliability tests: `python worker.py build|add|overwrite DIR N START [--slow]`.

It prints `ready` once imported, then writes N random 64-d vectors (ids START..START+N-1) and
prints `done`. Only the indexer layer is imported, so a process starts in about a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from indexer.config import IndexConfig  # noqa: E402
from indexer.index_dir import add_to_index_dir, build_index_dir  # noqa: E402
from indexer.store import VectorSet  # noqa: E402

DIM = 64
FP = {"encoder": "toy", "arch": {"type": "toy"}, "weights_sha256": "abc", "dim": DIM, "preprocess": {}}


def vectors(n: int, start: int) -> VectorSet:
    rng = np.random.default_rng(start)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rows = pd.DataFrame(
        {
            "id": [f"img{start + j}" for j in range(n)],
            "path": [f"/data/img{start + j}.png" for j in range(n)],
            "label": [("a", "b", "c")[j % 3] for j in range(n)],
            "patient_id": [f"p{(start + j) // 4}" for j in range(n)],
            "frame_index": pd.array([None] * n, dtype="Int64"),
        }
    )
    return VectorSet(rows, v, FP, {"name": "toy", "weights": None, "seed": 0})


def main() -> None:
    action, folder, n, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    vs = vectors(n, start)
    print("ready", flush=True)
    if action == "build":
        build_index_dir(folder, vs, IndexConfig(kind="flat", gpu=False))
    elif action == "overwrite":
        build_index_dir(folder, vs, IndexConfig(kind="flat", gpu=False), overwrite=True)
    elif action == "add":
        add_to_index_dir(folder, vs)
    else:
        raise SystemExit(f"unknown action {action}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
