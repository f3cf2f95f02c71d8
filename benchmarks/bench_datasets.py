"""Retrieval quality and speed on every dataset in ../shared/data, for several encoders.

For each (dataset, encoder): `retrieve index build` wall time, the wall time of one `retrieve query`
(encoder already loaded, as in a running service, and cold, as a fresh CLI call), and the
`retrieve eval` figures. The random-init resnet18 is the baseline measured in the same run.

    python benchmarks/bench_datasets.py [--data ../shared/data] [--encoders imagenet-effnet-lite0,resnet18]
                                        [--image-size 224] [--out benchmarks/results/datasets.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.index_dir import build_index_dir, open_index_dir  # noqa: E402
from retrieval.config import EncoderSpec, IndexConfig  # noqa: E402
from retrieval.evaluation.evaluate import EvalSettings, evaluate  # noqa: E402
from retrieval.pipeline import embed_dataset, load_encoder, query_files  # noqa: E402


def bench_one(data: Path, encoder: str, image_size: int, work: Path) -> dict:
    index_dir = work / f"{data.name}-{encoder}"
    t0 = time.perf_counter()
    loaded = load_encoder(EncoderSpec(encoder), {"image_size": image_size})
    vs, skipped = embed_dataset(data, loaded, progress=False)
    build_index_dir(index_dir, vs, IndexConfig(), overwrite=True)
    build_s = time.perf_counter() - t0
    idx = open_index_dir(index_dir)
    query_path = vs.rows["path"].iloc[len(vs) // 2]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        query_files(idx, loaded, [query_path], k=10)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval.cli.main", "query", query_path, "--index", str(index_dir), "--json"],
        capture_output=True,
        text=True,
    )
    cold_s = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    result = evaluate(vs.rows, vs.vectors, EvalSettings(), progress=False)
    o = result["overall"]
    return {
        "dataset": data.name,
        "encoder": encoder,
        "image_size": image_size,
        "images": len(vs),
        "skipped": len(skipped),
        "index_build_s": round(build_s, 2),
        "query_warm_s": round(sorted(times)[len(times) // 2], 4),
        "query_cli_cold_s": round(cold_s, 2),
        "map": round(o["map"], 4),
        "mrr": round(o["mrr"], 4),
        "p@1": round(o["p@1"], 4),
        "map@r": round(o["map@r"], 4),
        "knn_accuracy": round(o["knn_accuracy"], 4),
        "knn_balanced_accuracy": round(o["knn_balanced_accuracy"], 4),
        "n_queries": o["n_queries"],
        "queries_without_relevant": result["queries_without_relevant"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--encoders", default="imagenet-effnet-lite0,resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "datasets.json")
    args = ap.parse_args()
    datasets = sorted(p for p in args.data.iterdir() if (p / "labels.csv").is_file())
    if not datasets:
        sys.exit(f"no datasets with labels.csv under {args.data}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in datasets:
            for enc in args.encoders.split(","):
                r = bench_one(data, enc, args.image_size, Path(tmp))
                rows.append(r)
                print(f"done {data.name} / {enc}", file=sys.stderr, flush=True)
    header = [
        "dataset",
        "encoder",
        "images",
        "MAP",
        "MRR",
        "P@1",
        "kNN acc",
        "bal. acc",
        "build s",
        "query s (warm)",
        "query s (CLI)",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['dataset']} | {r['encoder']} | {r['images']} | {r['map']:.4f} | {r['mrr']:.4f} | {r['p@1']:.4f} | "
            f"{r['knn_accuracy']:.4f} | {r['knn_balanced_accuracy']:.4f} | {r['index_build_s']:.1f} | "
            f"{r['query_warm_s']:.3f} | {r['query_cli_cold_s']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "image_size": args.image_size,
        "eval": "leave-one-out, same patient_id and near_dup_group excluded, k=10 majority vote",
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
