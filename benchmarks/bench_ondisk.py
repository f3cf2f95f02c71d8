"""An IVF index with its lists on disk (`index build --on-disk`) against the same IVF held in one FAISS file.

N random clustered unit vectors (generated chunk by chunk, never all in memory at once) go through the
library's streaming build (`StreamingBuild`: Parquet part shards, IVF trained on a 100,000-vector sample,
filled shard by shard) twice, with the same training, once with the lists in the FAISS file (the
baseline, what `index build` does without `--on-disk`) and once with `--on-disk` (parts merged into a
memory-mapped lists file). Then, each in a fresh process:

- build: wall time and memory of the whole build process;
- open: time and memory to open the index folder, three ways: the baseline read whole (flags 0, what a
  writer does), the baseline memory-mapped (`IO_FLAG_MMAP_IFC`, what queries do today) and on-disk (the
  lists file mapped read-only);
- query: p50 / p99 of single queries (k = 10, nprobe 16) and recall@10 against exact search (numpy, in
  chunks), and the share of queries whose 10 results are identical between the two layouts;
- add: `index add` of --add vectors (a writer reads the baseline whole and writes it again; on-disk
  merges the old lists and the new vectors into a new lists file).

Memory is sampled from outside every process (/proc/PID/status every 20 ms): peak RSS (VmHWM, which
counts the pages of mapped files the process touched, page cache the kernel may take back) and peak
anonymous RSS (RssAnon: the process's own memory). One FAISS thread everywhere.

    nice -n 10 python benchmarks/bench_ondisk.py --n 1000000 --dim 256 [--nlist 1024] [--queries 200] \\
        [--add 10000] [--work DIR] [--out benchmarks/results/ondisk.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 50_000
CENTRES = 1_000
FP_BASE = {"encoder": "bench", "arch": {"type": "bench"}, "weights_sha256": "0", "preprocess": {}}
SPEC = {"name": "bench", "weights": None, "seed": 0}


def chunk_vectors(n: int, dim: int, k: int, seed_base: int = 0) -> np.ndarray:
    """Chunk k of the data set: rows k*CHUNK.. (clustered: CENTRES centres plus noise, unit length)."""
    centres = np.random.default_rng(12345).standard_normal((CENTRES, dim), dtype=np.float32)
    rng = np.random.default_rng(seed_base + k)
    rows = min(CHUNK, n - k * CHUNK)
    v = centres[rng.integers(0, CENTRES, rows)] + 0.8 * rng.standard_normal((rows, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def chunk_rows(start: int, rows: int) -> pd.DataFrame:
    ids = np.arange(start, start + rows)
    return pd.DataFrame(
        {
            "id": [f"case{j:08d}.png" for j in ids],
            "path": [f"/archive/case{j:08d}.png" for j in ids],
            "label": np.array(["normal", "mild", "moderate", "severe"])[ids % 4],
            "patient_id": [f"P{j // 6:07d}" for j in ids],
            "frame_index": pd.array([None] * rows, dtype="Int64"),
        }
    )


def _cfg(args: argparse.Namespace, on_disk: bool) -> Any:
    from indexer.config import IndexConfig

    return IndexConfig(kind="ivf", gpu=False, ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, on_disk=on_disk)


# --- the measured processes -------------------------------------------------------------------------


def child_build(args: argparse.Namespace) -> dict[str, Any]:
    from indexer.store import VectorSet
    from indexer.streaming import StreamingBuild

    fp = {**FP_BASE, "dim": args.dim}
    t0 = time.perf_counter()
    with StreamingBuild(args.folder, fp, SPEC, _cfg(args, args.mode == "disk")) as build:
        for k in range((args.n + CHUNK - 1) // CHUNK):
            v = chunk_vectors(args.n, args.dim, k)
            build.add(VectorSet(chunk_rows(k * CHUNK, len(v)), v, fp, SPEC))
        t1 = time.perf_counter()
        m = build.finish()
    t2 = time.perf_counter()
    return {"parts_s": t1 - t0, "faiss_s": t2 - t1, "build_s": t2 - t0, "count": m.count}


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def child_open(args: argparse.Namespace) -> dict[str, Any]:
    from indexer.index_dir import open_index_dir
    from indexer.search import search

    queries = np.load(args.queries_file)
    truth = np.load(args.truth_file)
    before = _status()
    t0 = time.perf_counter()
    idx = open_index_dir(args.folder, use_gpu=False, writable=args.mode == "read")
    open_s = time.perf_counter() - t0
    after = _status()
    _ = idx.live_ids  # what every query reads next (the shards' row ids)
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = search(idx, q[None, :], k=10)[0]
        times.append(time.perf_counter() - t)
        found.append([h.row_id for h in hits])
    ids = np.array(found)
    end = _status()
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
    np.save(args.answers_file, ids)
    return {
        "open_s": open_s,
        "rss_open_mb": (after["VmRSS"] - before["VmRSS"]) / 1024,
        "anon_open_mb": (after["RssAnon"] - before["RssAnon"]) / 1024,
        "rss_after_queries_mb": (end["VmRSS"] - before["VmRSS"]) / 1024,
        "p50_ms": float(np.percentile(times, 50) * 1000),
        "p99_ms": float(np.percentile(times, 99) * 1000),
        "recall_at_10": recall,
    }


def child_add(args: argparse.Namespace) -> dict[str, Any]:
    from indexer.index_dir import add_to_index_dir
    from indexer.store import VectorSet

    fp = {**FP_BASE, "dim": args.dim}
    v = chunk_vectors(args.add, args.dim, 0, seed_base=777)
    rows = chunk_rows(10**9, len(v))
    t0 = time.perf_counter()
    m, added = add_to_index_dir(args.folder, VectorSet(rows, v, fp, SPEC))
    return {"add_s": time.perf_counter() - t0, "added": added, "count": m.count}


# --- the driver -----------------------------------------------------------------------------------


def _measure(argv: list[str]) -> dict[str, Any]:
    """Run this script as a child process; sample its memory from outside every 20 ms."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak_anon = peak_rss = hwm = 0
    while p.poll() is None:
        try:
            for line in open(f"/proc/{p.pid}/status"):
                key, _, value = line.partition(":")
                if key == "RssAnon":
                    peak_anon = max(peak_anon, int(value.split()[0]))
                elif key == "VmRSS":
                    peak_rss = max(peak_rss, int(value.split()[0]))
                elif key == "VmHWM":
                    hwm = max(hwm, int(value.split()[0]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_mb": max(hwm, peak_rss) / 1024, "peak_anon_mb": peak_anon / 1024}


def exact_top10(args: argparse.Namespace, queries: np.ndarray) -> np.ndarray:
    """Exact inner-product top 10 over all N vectors, chunk by chunk (the independent reference)."""
    best_s = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 10), dtype=np.int64)
    for k in range((args.n + CHUNK - 1) // CHUNK):
        s = queries @ chunk_vectors(args.n, args.dim, k).T
        ids = np.broadcast_to(np.arange(k * CHUNK, k * CHUNK + s.shape[1]), s.shape)
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, ids], axis=1)
        top = np.argsort(-all_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def _size_mb(folder: Path, suffixes: tuple[str, ...]) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in suffixes) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--add", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=None, help="folder for the two indexes (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ondisk.json")
    ap.add_argument("--child", choices=["build", "open", "add"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="mem", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--truth-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--answers-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import faiss

        faiss.omp_set_num_threads(1)
        fn = {"build": child_build, "open": child_open, "add": child_add}[args.child]
        print(json.dumps(fn(args)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_ondisk-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--n", str(args.n), "--dim", str(args.dim), "--nlist", str(args.nlist), "--nprobe", str(args.nprobe)]
    folders = {"mem": work / "in-file", "disk": work / "on-disk"}
    for f in folders.values():
        shutil.rmtree(f, ignore_errors=True)
    t0 = time.perf_counter()
    queries = chunk_vectors(args.queries, args.dim, 0, seed_base=999)
    truth = exact_top10(args, queries)
    exact_s = time.perf_counter() - t0
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth)

    builds = {}
    for mode, folder in folders.items():
        print(f"build {mode} ...", file=sys.stderr, flush=True)
        builds[mode] = _measure(["--child", "build", "--mode", mode, "--folder", str(folder), *common])
        builds[mode]["faiss_files_mb"] = _size_mb(folder, (".faiss", ".ivfdata"))
    opens = {}
    for mode, folder in (("read", folders["mem"]), ("mmap_ifc", folders["mem"]), ("disk", folders["disk"])):
        print(f"open {mode} ...", file=sys.stderr, flush=True)
        files = [
            "--queries-file", str(work / "queries.npy"), "--truth-file", str(work / "truth.npy"),
            "--answers-file", str(work / f"answers-{mode}.npy"),
        ]  # fmt: skip
        opens[mode] = _measure(["--child", "open", "--mode", mode, "--folder", str(folder), *common, *files])
    same = np.all(np.load(work / "answers-disk.npy") == np.load(work / "answers-mmap_ifc.npy"), axis=1)
    adds = {}
    for mode, folder in folders.items():
        print(f"add {mode} ...", file=sys.stderr, flush=True)
        adds[mode] = _measure(
            ["--child", "add", "--mode", mode, "--folder", str(folder), "--add", str(args.add), *common]
        )

    result = {
        "n": args.n,
        "dim": args.dim,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "queries": args.queries,
        "exact_reference_s": exact_s,
        "identical_top10_share": float(same.mean()),
        "build": builds,
        "open": opens,
        "add": adds,
        "machine": {"cpu_count": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    b, o, a = r["build"], r["open"], r["add"]
    lines = [
        f"N = {r['n']:,}, d = {r['dim']}, IVF{r['nlist']},Flat, nprobe {r['nprobe']}, {r['queries']} queries, "
        f"one thread",
        "",
        "| build | wall s | of it FAISS s | peak RSS MB | peak anon MB | FAISS files MB |",
        "|---|---|---|---|---|---|",
    ]
    names = {"mem": "lists in the FAISS file", "disk": "`--on-disk`"}
    for mode in ("mem", "disk"):
        x = b[mode]
        lines.append(
            f"| {names[mode]} | {x['build_s']:.1f} | {x['faiss_s']:.1f} | {x['peak_rss_mb']:.0f} | "
            f"{x['peak_anon_mb']:.0f} | {x['faiss_files_mb']:.0f} |"
        )
    lines += [
        "",
        "| open | open s | RSS after open MB | anon after open MB | RSS after queries MB | p50 ms | p99 ms "
        "| recall@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    onames = {
        "read": "FAISS file read whole (flags 0)",
        "mmap_ifc": "FAISS file, `IO_FLAG_MMAP_IFC`",
        "disk": "`--on-disk`, lists mapped",
    }
    for mode in ("read", "mmap_ifc", "disk"):
        x = o[mode]
        lines.append(
            f"| {onames[mode]} | {x['open_s']:.3f} | {x['rss_open_mb']:.0f} | {x['anon_open_mb']:.0f} | "
            f"{x['rss_after_queries_mb']:.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['recall_at_10']:.3f} |"
        )
    lines += [
        "",
        f"Identical top-10 lists, on-disk vs in-file: {r['identical_top10_share']:.3f} of the queries.",
        "",
        "| `index add` | vectors | wall s | peak RSS MB | peak anon MB |",
        "|---|---|---|---|---|",
    ]
    for mode in ("mem", "disk"):
        x = a[mode]
        lines.append(
            f"| {names[mode]} | {x['added']:,} | {x['add_s']:.1f} | {x['peak_rss_mb']:.0f} | {x['peak_anon_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
