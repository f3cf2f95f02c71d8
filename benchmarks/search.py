"""Nearest-neighbour search at archive scale: our FAISS kinds against scikit-learn and hnswlib.

Cells: N vectors (100k; 1M with --large) x d (256, 1280) x data (random: normalised Gaussian;
clustered: 1,000 Gaussian centres, noise 0.5 per coordinate, normalised). Queries come from the same
distribution but are not in the index. In each cell, each method runs in a process of its own
(peak memory = that process's VmHWM, which includes the cell's data, loaded once):

- sklearn:  NearestNeighbors(algorithm="brute", metric="cosine"), the baseline for QPS
- flat, hnsw, ivf, ivfsq, ivfpq: our kinds (indexer.faiss_index.build_index) at their default settings
- auto:     our `auto` kind for N, then tuned to recall@10 >= 0.95 on 500 tuning queries (as
            `retrieve index tune --recall 0.95` does), measured on the separate evaluation queries;
            where auto resolves to hnsw it shares the hnsw build (same index, same process)
- hnswlib:  the reference HNSW (space "ip", M=32, ef_construction=40: FAISS's defaults), if installed

Times are CPU seconds of the method's process by default (--clock cpu) with every method on one thread
(--threads 1: FAISS's OpenMP, BLAS, hnswlib): on a shared machine under load, wall-clock times measure the
other users; CPU time measures the work. --clock wall --threads N gives elapsed-time figures instead.

Measured: build time, peak RSS, batched QPS (1,000 queries at once), single-query p50/p99 (200
queries one by one), recall@10 against exact search; for HNSW-like and IVF methods also the QPS of
the cheapest setting reaching recall 0.95 (QPS@.95, swept on the evaluation queries: the equal-recall
comparison of hnsw and hnswlib). Flat's batched search is compared with a bare sgemm of the same
shape (numpy float32 matmul, queries x vectors.T) timed in the same process.

    nice -n 10 python benchmarks/search.py [--large] [--dims 256,1280] [--data random,clustered]
        [--methods sklearn,flat,hnsw,ivf,ivfpq,auto,hnswlib] [--budget 1800] [--threads 1] [--clock cpu|wall]
        [--sklearn-queries 300] [--out benchmarks/results/search.json]

IVF kinds train on at most 100,000 vectors evenly drawn (indexer.streaming.TRAIN_SAMPLE), as a streaming
`index build` does. A sweep stops at recall 0.999, or past 0.95 once deeper settings stop gaining.
--sklearn-queries measures scikit-learn on that many of the evaluation queries (its brute force at 1M
costs seconds a query; QPS needs only a few hundred).

--budget bounds the whole run in seconds: cells not started in time are listed as skipped, and each
method process is stopped after --cell-timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 10
N_EVAL = 1000
N_TUNE = 500
N_SINGLE = 200
TARGET = 0.95
EF_SWEEP = [16, 32, 64, 128, 256, 512, 1024]
SWEEP_STEP_S = 60.0  # a sweep stops past the target once one setting takes this long
METHODS = ["sklearn", "flat", "hnsw", "ivf", "ivfsq", "ivfpq", "auto", "hnswlib"]
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time  # set per run (--clock): CPU seconds of the whole process, or wall-clock seconds


# --- data (generated once per cell by the parent, loaded by each method's process) -----------------


def make_data(n: int, d: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    centres = np.random.default_rng(12345 + d).standard_normal((1000, d), dtype=np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        block = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            block = centres[rng.integers(0, 1000, m)] + 0.5 * block
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(q), k), dtype=np.int64)
    step = int(min(250, max(1, 2**24 // len(x))))  # at most 64 MB of similarities at once (64 queries at 1M)
    for s in range(0, len(q), step):
        sims = q[s : s + step] @ x.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[s : s + step] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)])
    )


# --- one method, in its own process ------------------------------------------------------------------


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_search(fn, q: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = clock()
    ids = fn(q)
    return ids, clock() - t0


def latency(fn, q: np.ndarray) -> tuple[float, float]:
    """p50 and p99 ms of one query at a time, over the given queries."""
    times = []
    for i in range(len(q)):
        t0 = clock()
        fn(q[i : i + 1])
        times.append(1000 * (clock() - t0))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def measure(
    fn, q: np.ndarray, truth: np.ndarray, one_thread_single: bool = False, n_single: int = N_SINGLE
) -> dict[str, float]:
    """Batched QPS and recall on all queries; single-query latency (FAISS on one OpenMP thread, as a server
    answering concurrent queries would run it: a team of threads per query only waits on a loaded machine)."""
    fn(q[:10])  # warm up
    ids, t = timed_search(fn, q)
    if one_thread_single:
        import faiss

        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
    p50, p99 = latency(fn, q[:n_single])
    if one_thread_single:
        faiss.omp_set_num_threads(before)
    return {"qps": len(q) / t, "p50_ms": p50, "p99_ms": p99, "recall": recall(ids, truth), "queries": len(q)}


def qps_at_target(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cheapest swept setting (points in increasing cost) reaching TARGET recall."""
    for p in points:
        if p["recall"] >= TARGET:
            return p
    return None


def run_faiss(method: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray, tq: np.ndarray, tt: np.ndarray):

    from indexer.config import IndexConfig
    from indexer.faiss_index import fill_index, new_index, search_parameters
    from indexer.kinds import choose_kind
    from indexer.streaming import TRAIN_SAMPLE
    from indexer.tune import parameter_space

    kind = choose_kind(len(x)) if method == "auto" else method
    t0 = clock()
    index, resolved, params = new_index(x.shape[1], len(x), kind, IndexConfig(gpu=False), use_gpu=False)
    step = -(-len(x) // TRAIN_SAMPLE)  # IVF k-means on at most TRAIN_SAMPLE vectors, as a streaming build trains
    ids = np.arange(len(x), dtype=np.int64)
    fill_index(index, lambda: [(x, ids)], sample=lambda: x[::step], use_gpu=False)
    build_s = clock() - t0

    def searcher(prm: dict[str, Any]):
        def fn(qq: np.ndarray) -> np.ndarray:
            return index.search(qq, K, params=search_parameters(index, K, prm))[1]

        return fn

    rows = []
    base = {"build_s": build_s, "factory": params.get("factory")}
    space = parameter_space(index)  # as `index tune` sweeps it (the polysemous threshold ht left out)
    names = [space.combination_name(c) for c in range(space.n_combinations())]
    if resolved == "hnsw":
        names = [f"efSearch={ef}" for ef in EF_SWEEP]
    if method != "auto":  # auto reports its tuned setting only
        default = {**base, **measure(searcher(params), q, truth, True), "setting": _setting(params)}
        if method == "flat":
            default.update(sgemm(x, q))
        sweep = []
        for name in names[:16]:
            if name:
                space.set_index_parameters(index, name)
            found, t = timed_search(searcher({}), q)
            sweep.append({"setting": name, "qps": len(q) / t, "recall": recall(found, truth)})
            if sweep_done(sweep, t):
                break
        default["sweep"] = sweep
        default["at_target"] = qps_at_target(sweep)
        rows.append({"method": method, **default})
    if method == "auto" or (method == "hnsw" and choose_kind(len(x)) == "hnsw"):
        # auto: tuned like `index tune --recall 0.95`, on the tuning queries; evaluated on the others
        chosen = None
        for name in names[:16]:
            if name:
                space.set_index_parameters(index, name)
            ids = index.search(tq, K, params=search_parameters(index, K, {}))[1]
            if recall(ids, tt) >= TARGET:
                chosen = name
                break
        chosen = chosen if chosen is not None else names[-1]
        if chosen:
            space.set_index_parameters(index, chosen)
        tuned = {**base, **measure(searcher({}), q, truth, True)}
        tuned["setting"] = f"{resolved}, tuned: {chosen}" if chosen else f"{resolved} (nothing to tune)"
        rows.append({"method": "auto", **tuned, "at_target": None})
    return rows


def sweep_done(sweep: list[dict[str, Any]], seconds: float) -> bool:
    """Stop a sweep (settings cheap to dear) at recall 0.999; past the target, once two deeper settings gained
    less than 0.002 together (quantised codes cap the recall below 1) or one setting took over SWEEP_STEP_S."""
    last = sweep[-1]["recall"]
    if last >= 0.999:
        return True
    if last >= TARGET and (seconds > SWEEP_STEP_S or (len(sweep) >= 3 and last - sweep[-3]["recall"] < 0.002)):
        return True
    return False


def _setting(params: dict[str, Any]) -> str:
    keys = [k for k in ("nlist", "nprobe", "hnsw_m", "ef_search", "pq_m", "pq_nbits") if k in params]
    return ", ".join(f"{k}={params[k]}" for k in keys) or "exact"


def sgemm(x: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """The bare rate: queries x vectors.T as one float32 matmul, best of 3 (same shape as flat's search)."""
    best = float("inf")
    xt = np.ascontiguousarray(x)
    for _ in range(3):
        t0 = clock()
        for s in range(0, len(xt), 100_000):
            _ = q @ xt[s : s + 100_000].T
        best = min(best, clock() - t0)
    flops = 2.0 * len(q) * len(x) * x.shape[1]
    return {"sgemm_gflops": flops / best / 1e9, "sgemm_qps": len(q) / best}


def run_sklearn(x: np.ndarray, q: np.ndarray, truth: np.ndarray, queries: int = 0):
    """scikit-learn's brute force; with `queries`, measured on the first `queries` evaluation queries only
    (its QPS does not depend on which; single-query latency on a fifth of them)."""
    from sklearn.neighbors import NearestNeighbors

    t0 = clock()
    nn = NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine").fit(x)
    build_s = clock() - t0
    if queries:
        q, truth = q[:queries], truth[:queries]
    single = min(N_SINGLE, max(1, len(q) // 5)) if queries else N_SINGLE
    res = measure(lambda qq: nn.kneighbors(qq, K, return_distance=False), q, truth, n_single=single)
    setting = f"brute, cosine ({len(q)} queries)" if queries else "brute, cosine"
    return [{"method": "sklearn", "build_s": build_s, "setting": setting, **res}]


def run_hnswlib(x: np.ndarray, q: np.ndarray, truth: np.ndarray, threads: int):
    import hnswlib

    t0 = clock()
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), ef_construction=40, M=32)
    index.set_num_threads(threads)
    index.add_items(x, np.arange(len(x)))
    build_s = clock() - t0

    def fn(qq: np.ndarray) -> np.ndarray:
        return index.knn_query(qq, k=K)[0].astype(np.int64)

    index.set_ef(128)
    res = measure(fn, q, truth)
    sweep = []
    for ef in EF_SWEEP:
        index.set_ef(max(ef, K))
        ids, t = timed_search(fn, q)
        sweep.append({"setting": f"ef={ef}", "qps": len(q) / t, "recall": recall(ids, truth)})
        if sweep[-1]["recall"] >= 0.999:
            break
    row = {"method": "hnswlib", "build_s": build_s, "setting": "M=32, ef=128", **res}
    return [{**row, "sweep": sweep, "at_target": qps_at_target(sweep)}]


def child(spec: dict[str, Any]) -> None:
    global clock
    clock = CLOCKS[spec["clock"]]
    import faiss

    faiss.omp_set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    x = np.load(folder / "x.npy")
    q, truth = np.load(folder / "q.npy"), np.load(folder / "truth.npy")
    tq, tt = np.load(folder / "tq.npy"), np.load(folder / "tt.npy")
    method = spec["method"]
    if method == "sklearn":
        rows = run_sklearn(x, q, truth, spec.get("sklearn_queries", 0))
    elif method == "hnswlib":
        rows = run_hnswlib(x, q, truth, spec["threads"])
    else:
        rows = run_faiss(method, x, q, truth, tq, tt)
    peak = vm_hwm_mb()
    print(json.dumps([{**r, "peak_mb": peak} for r in rows]))


# --- the parent: cells, budget, table ---------------------------------------------------------------


def run_cell(n: int, d: int, data: str, methods: list[str], args, deadline: float) -> list[dict[str, Any]]:
    from indexer.kinds import choose_kind

    rows: list[dict[str, Any]] = []
    cell = {"n": n, "d": d, "data": data}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        folder = Path(tmp)
        x = make_data(n, d, data, seed=1)
        q = make_data(N_EVAL + N_TUNE, d, data, seed=2)
        np.save(folder / "x.npy", x)
        np.save(folder / "q.npy", q[:N_EVAL])
        np.save(folder / "tq.npy", q[N_EVAL:])
        np.save(folder / "truth.npy", exact_topk(x, q[:N_EVAL], K))
        np.save(folder / "tt.npy", exact_topk(x, q[N_EVAL:], K))
        data_mb = x.nbytes / 2**20
        del x, q
        todo = list(methods)
        if "auto" in todo and "hnsw" in todo and choose_kind(n) == "hnsw":
            todo.remove("auto")  # the hnsw process reports auto too (same index)
        for method in todo:
            left = deadline - time.monotonic()
            if left < 30:
                rows.append({**cell, "method": method, "skipped": "run budget spent"})
                continue
            spec = {"folder": str(folder), "method": method, "threads": args.threads, "clock": args.clock}
            spec["sklearn_queries"] = args.sklearn_queries
            cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
            threads = str(args.threads)  # BLAS (scikit-learn, numpy) and OpenMP (FAISS) alike
            env = {
                **os.environ,
                "OMP_NUM_THREADS": threads,
                "OPENBLAS_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
            }
            try:
                out = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=min(args.cell_timeout, left), check=False, env=env
                )
            except subprocess.TimeoutExpired:
                rows.append({**cell, "method": method, "skipped": f"over {min(args.cell_timeout, left):.0f} s"})
                print(f"  {n} {d} {data} {method}: timed out", file=sys.stderr, flush=True)
                continue
            if out.returncode != 0:
                err = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
                rows.append({**cell, "method": method, "skipped": f"failed: {err}"})
                continue
            for r in json.loads(out.stdout.strip().splitlines()[-1]):
                rows.append({**cell, "data_mb": data_mb, **r})
                print(f"  {n} {d} {data} {r['method']}: {_brief(r)}", file=sys.stderr, flush=True)
    return rows


def _brief(r: dict[str, Any]) -> str:
    return f"qps {r['qps']:.0f} recall {r['recall']:.3f} build {r['build_s']:.1f}s peak {r['peak_mb']:.0f}MB"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | d | data | method | setting | build s | peak MB | batched QPS | x sklearn | p50 ms | p99 ms "
        "| recall@10 | QPS@.95 (setting) |"
    )
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    base = {(r["n"], r["d"], r["data"]): r["qps"] for r in rows if r.get("method") == "sklearn" and "qps" in r}
    for r in rows:
        key = (r["n"], r["d"], r["data"])
        if "skipped" in r:
            lines.append(
                f"| {r['n']:,} | {r['d']} | {r['data']} | {r['method']} | not run: {r['skipped']} |" + " |" * 8
            )
            continue
        ratio = f"{r['qps'] / base[key]:.1f}" if key in base else "-"
        at = r.get("at_target")
        at_s = f"{at['qps']:.0f} ({at['setting'] or 'exact'})" if at else ("-" if "sweep" not in r else "not reached")
        lines.append(
            f"| {r['n']:,} | {r['d']} | {r['data']} | {r['method']} | {r['setting']} | {r['build_s']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['qps']:.0f} | {ratio} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['recall']:.3f} | {at_s} |"
        )
    return "\n".join(lines)


def readings(rows: list[dict[str, Any]]) -> list[str]:
    """The three targets, read from this run's rows."""
    out = []
    by = {(r["n"], r["d"], r["data"], r["method"]): r for r in rows if "qps" in r}
    for (n, d, data, method), r in sorted(by.items()):
        key = (n, d, data)
        if method == "flat" and "sgemm_gflops" in r:
            flops = 2.0 * N_EVAL * n * d
            rate = flops / (N_EVAL / r["qps"]) / 1e9
            out.append(
                f"flat {n:,}x{d} {data}: {rate:.1f} GFLOP/s = {rate / r['sgemm_gflops']:.2f} of sgemm "
                f"({r['sgemm_gflops']:.1f} GFLOP/s; target >= 0.85)"
            )
        if method == "auto" and (*key, "sklearn") in by:
            ratio = r["qps"] / by[(*key, "sklearn")]["qps"]
            out.append(
                f"auto {n:,}x{d} {data}: recall@10 {r['recall']:.3f} at {ratio:.1f}x sklearn's QPS "
                f"(target at 1M: >= 0.95 at >= 20x)"
            )
        if method == "hnsw" and (*key, "hnswlib") in by:
            a, b = r.get("at_target"), by[(*key, "hnswlib")].get("at_target")
            if a and b:
                out.append(
                    f"hnsw {n:,}x{d} {data}: at recall >= {TARGET}: {a['qps']:.0f} QPS ({a['setting']}) vs hnswlib "
                    f"{b['qps']:.0f} ({b['setting']}) = {a['qps'] / b['qps']:.2f}x (target >= 0.8)"
                )
            else:
                out.append(f"hnsw {n:,}x{d} {data}: recall {TARGET} not reached by {'hnsw' if not a else 'hnswlib'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--large", action="store_true", help="also N=1,000,000")
    ap.add_argument("--sizes", default="", help="comma-separated N (overrides the default 100000 [+ 1000000])")
    ap.add_argument("--dims", default="256,1280")
    ap.add_argument("--data", default="random,clustered")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--large-dims", default="256", help="dims run at 1M (each 1M x 1280 cell is ~5 GB, hours here)")
    ap.add_argument("--threads", type=int, default=1, help="threads of every method (FAISS, BLAS, hnswlib)")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: CPU seconds of the method's process (fair on a shared, loaded machine, with --threads 1); "
        "wall: elapsed seconds",
    )
    ap.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run")
    ap.add_argument(
        "--sklearn-queries",
        type=int,
        default=0,
        help="measure scikit-learn on this many of the evaluation queries (0: all; its QPS needs a few hundred)",
    )
    ap.add_argument("--cell-timeout", type=float, default=600.0, help="seconds for one method in one cell")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search.json")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    methods = [m for m in args.methods.split(",") if m]
    if "hnswlib" in methods:
        try:
            import hnswlib  # noqa: F401
        except ImportError:
            methods.remove("hnswlib")
            print("hnswlib not installed (pip install 'retrieve[bench]'): left out", file=sys.stderr)
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([100_000, 1_000_000] if args.large else [100_000])
    dims = [int(d) for d in args.dims.split(",")]
    large_dims = [int(d) for d in args.large_dims.split(",")]
    cells = [
        (n, d, data) for n in sizes for d in dims for data in args.data.split(",") if n < 1_000_000 or d in large_dims
    ]
    deadline = time.monotonic() + args.budget
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for n, d, data in cells:
        print(f"cell N={n} d={d} {data}", file=sys.stderr, flush=True)
        rows += run_cell(n, d, data, methods, args, deadline)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "clock": args.clock,
        "load_avg_at_end": os.getloadavg(),
        "seconds": time.time() - t0,
        "k": K,
        "queries": {"eval": N_EVAL, "tune": N_TUNE, "single": N_SINGLE},
        "rows": rows,
    }
    report["readings"] = readings(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    md = table(rows) + "\n\n" + "\n".join(f"- {line}" for line in report["readings"]) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
