"""A query against a large index costs about what it costs against a small one.

Builds two flat indexes with the default encoder's fingerprint, one of N_SMALL and one of N_LARGE
random 1280-d vectors (a few thousand real images would only slow the build; the store does not
look at the values), then measures, for each:

- one whole `retrieve query` process (encoder load, index open, embed, search, rows of the hits):
  wall time and peak RSS, median of --repeats;
- the bare baseline of a query, also a whole process: import, encoder load, one forward pass of the
  image and a FAISS search, nothing else (no CLI, no rows, no self-exclusion, no JSON); issue 13 asks
  `retrieve query` to stay within 1.5x of it;
- in-process, with the index opened: the query's store work (search + reading the rows of its
  hits) against the bare baseline of reading the whole store into pandas, which is what a query
  did before the sharded store (the peer measured in the same run).

    python benchmarks/bench_store.py [--large 200000] [--small 1000] [--repeats 3] [--out benchmarks/results/store.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.config import IndexConfig  # noqa: E402
from indexer.index_dir import build_index_dir, open_index_dir  # noqa: E402
from indexer.search import search  # noqa: E402
from indexer.store import VectorSet  # noqa: E402
from retrieval.config import EncoderSpec  # noqa: E402
from retrieval.pipeline import load_encoder  # noqa: E402


def make_index(folder: Path, n: int, fingerprint: dict, spec: dict, dim: int) -> float:
    rng = np.random.default_rng(n)
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):  # in blocks, to keep the generator's temporaries small
        block = rng.standard_normal((min(50_000, n - start), dim), dtype=np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    rows = pd.DataFrame(
        {
            "id": [f"case{j:07d}.png" for j in range(n)],
            "path": [f"/archive/case{j:07d}.png" for j in range(n)],
            "label": np.array(["normal", "mild", "moderate", "severe"])[np.arange(n) % 4],
            "patient_id": [f"P{j // 6:06d}" for j in range(n)],
            "frame_index": pd.array([None] * n, dtype="Int64"),
        }
    )
    t0 = time.perf_counter()
    build_index_dir(folder, VectorSet(rows, vectors, fingerprint, spec), IndexConfig(kind="flat", gpu=False))
    return time.perf_counter() - t0


PEAK_PROBE = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('peak_kb=' + line.split()[1] + '\\n')\n"
    "atexit.register(_peak)\n"
    "from retrieval.cli.main import main\n"
    "main(sys.argv[1:])\n"
)


BARE_QUERY = (
    "import sys\n"
    "from indexer.index_dir import open_index_dir\n"
    "from indexer.search import search\n"
    "from retrieval.config import EncoderSpec\n"
    "from retrieval.pipeline import embed_query_image, load_encoder\n"
    "loaded = load_encoder(EncoderSpec('imagenet-effnet-lite0'))\n"
    "_, vec = embed_query_image(sys.argv[1], loaded)\n"
    "hits = search(open_index_dir(sys.argv[2], use_gpu=False), vec, 10)[0]\n"
    "assert len(hits) == 10\n"
)


def bare_query(index: Path, image: Path) -> float:
    """Wall seconds of the bare baseline process (model load + one forward + search)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", BARE_QUERY, str(image), str(index)], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode != 0:
        raise SystemExit(f"bare query failed: {out.stderr}")
    return time.perf_counter() - t0


def cli_query(index: Path, image: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one `retrieve query` process.

    The peak is the process's own VmHWM, read as it exits: ru_maxrss would include the memory of this
    benchmark process at the moment it forked the query (Linux keeps that high-water mark across exec).
    """
    args = ["query", str(image), "--index", str(index), "--k", "10", "--json"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"query failed: {out.stderr}")
    json.loads(out.stdout)
    peaks = [int(line.split("=")[1]) for line in out.stderr.splitlines() if line.startswith("peak_kb=")]
    return wall, (peaks[-1] / 1024 if peaks else float("nan"))


def store_work(index: Path, repeats: int) -> dict:
    idx = open_index_dir(index, use_gpu=False)
    q = np.random.default_rng(0).standard_normal((1, idx.manifest.dim)).astype(np.float32)
    q /= np.linalg.norm(q)
    lazy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        hits = search(idx, q, 10)[0]
        idx.fetch([h.row_id for h in hits])
        lazy.append(time.perf_counter() - t0)
    full = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for shard in idx.manifest.shards:
            pd.read_parquet(index / shard["name"])
        full.append(time.perf_counter() - t0)
    return {"query_store_s": statistics.median(lazy), "read_whole_store_s": statistics.median(full)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "store.json")
    args = ap.parse_args()
    loaded = load_encoder(EncoderSpec("imagenet-effnet-lite0"))
    dim = loaded.encoder.dim
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = work / "query.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256), dtype=np.uint8)).save(image)
        for n in (args.small, args.large):
            index = work / f"idx-{n}"
            build_s = make_index(index, n, loaded.fingerprint, loaded.spec.to_dict(), dim)
            size_mb = sum(p.stat().st_size for p in index.iterdir()) / 2**20
            runs, bare = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same machine
                runs.append(cli_query(index, image))
                bare.append(bare_query(index, image))
            row = {
                "images": n,
                "index_mb": round(size_mb, 1),
                "build_s": round(build_s, 2),
                "cli_query_s": round(statistics.median(r[0] for r in runs), 2),
                "bare_query_s": round(statistics.median(bare), 2),
                "cli_peak_rss_mb": round(max(r[1] for r in runs), 0),
                **{k: round(v, 4) for k, v in store_work(index, args.repeats).items()},
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    small, large = results
    ratio = large["cli_query_s"] / small["cli_query_s"]
    over_bare = large["cli_query_s"] / large["bare_query_s"]
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}",
        "encoder": "imagenet-effnet-lite0",
        "dim": dim,
        "results": results,
        "cli_query_ratio_large_over_small": round(ratio, 2),
        "cli_query_over_bare_at_large": round(over_bare, 2),
    }
    print()
    print(
        "| images | index MB | build s | `retrieve query` s | bare query s | peak RSS MB | store work per query s "
        "| read whole store s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['images']:,} | {r['index_mb']} | {r['build_s']} | {r['cli_query_s']} | {r['bare_query_s']} "
            f"| {r['cli_peak_rss_mb']:.0f} "
            f"| {r['query_store_s']} | {r['read_whole_store_s']} |"
        )
    print(f"\n`retrieve query` at {args.large:,} images / at {args.small:,}: {ratio:.2f}x (target <= 1.5x)")
    print(f"`retrieve query` / bare query at {args.large:,} images: {over_bare:.2f}x (target <= 1.5x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
