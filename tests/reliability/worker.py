"""A writer process for the reliability tests: `python worker.py ACTION DIR N START`.

It prints `ready` once imported, then does ACTION and prints `done`. build, add, overwrite, stream and
resume write N random 64-d vectors (ids START..START+N-1); remove takes out the rows with row ids
START..START+N-1; compact rewrites the index without its removed rows (N, START unused). Only the
indexer layer is imported, so a process starts in about a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from indexer.config import IndexConfig  # noqa: E402
from indexer.index_dir import (  # noqa: E402
    add_to_index_dir,
    build_index_dir,
    compact_index_dir,
    remove_from_index_dir,
)
from indexer.store import VectorSet  # noqa: E402
from indexer.streaming import StreamingBuild  # noqa: E402

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


def config(kind: str) -> IndexConfig:
    """The index kinds the kill test rotates through: exact (FAISS removes at once) and on-disk IVF (tombstones)."""
    if kind == "ivf-disk":
        return IndexConfig(kind="ivf", gpu=False, on_disk=True)
    return IndexConfig(kind=kind, gpu=False)


def stream(folder: Path, vs: VectorSet, resume: bool, chunk: int = 2_000) -> None:
    """A streaming build in chunks, as `index build` runs one (resumable)."""
    with StreamingBuild(folder, FP, vs.encoder_spec, IndexConfig(kind="flat", gpu=False), resume=resume) as build:
        todo = build.pending(vs.rows)
        keep = vs.rows["id"].isin(set(todo["id"])).to_numpy()
        rows, vectors = vs.rows.loc[keep].reset_index(drop=True), vs.vectors[keep]
        for start in range(0, len(rows), chunk):
            part = rows.iloc[start : start + chunk].reset_index(drop=True)
            build.add(VectorSet(part, vectors[start : start + chunk], FP, vs.encoder_spec))
        build.finish()


def main() -> None:
    action, folder, n, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if action in ("remove", "compact"):
        print("ready", flush=True)
        if action == "remove":
            gone = np.arange(start, start + n, dtype=np.int64)
            remove_from_index_dir(folder, lambda idx: np.isin(idx.live_ids, gone))
        else:
            compact_index_dir(folder)
        print("done", flush=True)
        return
    vs = vectors(n, start)
    print("ready", flush=True)
    if action == "build":
        build_index_dir(folder, vs, IndexConfig(kind="flat", gpu=False))
    elif action == "overwrite":
        build_index_dir(folder, vs, IndexConfig(kind="flat", gpu=False), overwrite=True)
    elif action == "add":
        add_to_index_dir(folder, vs)
    elif action in ("stream", "resume"):
        stream(folder, vs, resume=action == "resume")
    else:
        raise SystemExit(f"unknown action {action}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
