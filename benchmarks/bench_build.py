"""`index build --vectors FOLDER` at archive scale: peak memory and time, next to the FAISS index's own size.

Issue 12: "Peak memory must not grow with N beyond the FAISS index itself". For each cell (N vectors of
d dims) a Parquet shard folder is written in 50,000-row shards (the layout `retrieve embed --engine ray`
writes and `index build --vectors FOLDER` reads: indexer.shards.write_shard, `row_id`, the vector as
fixed_size_list<float32>, an encoder fingerprint), generated shard by shard so that this process stays
small. Vectors are clustered unit vectors (1,000 centres, noise 0.5, as benchmarks/search.py). Then,
for each kind and method, one process builds an index from the folder:

- cli:    `retrieve index build --vectors FOLDER --index OUT --kind KIND` (the CLI as it is)
- stream: indexer.streaming.build_from_vectors(OUT, FOLDER, IndexConfig(kind=KIND)): the folder read
          a chunk at a time into part shards, FAISS trained on a sample and filled shard by shard
- compact: `index compact` (indexer.index_dir.compact_index_dir) of an index of the folder (streaming build)
          from which every REMOVE-th row id was removed (`--remove`, in a process of its own, not measured);
          each compact works on a fresh copy of that index
- compact-base: the same compact with the code of another checkout (`--base DIR`, e.g. a `git worktree` of
          the commit before a change): the child runs in DIR with DIR first on PYTHONPATH, so that before and
          after are measured in the same run on the same index

Measured per process: wall and CPU seconds (user + sys of the child), peak RSS (the process's own VmHWM,
read as it exits: ru_maxrss would include this benchmark's memory at the fork), the FAISS file's size,
and overhead = peak RSS - FAISS file size: what must not grow with N. The baseline is the same method at
the smallest N of the run (a process's fixed cost: imports, the interpreter).

    nice -n 10 python benchmarks/bench_build.py --cells "100000x256:flat,auto,hnsw;1000000x256:flat,auto:stream" \\
        [--methods cli,stream] [--timeout 1800] [--work DIR] [--out benchmarks/results/build.json]
    nice -n 10 python benchmarks/bench_build.py --cells "100000x256:flat;1000000x256:flat" \\
        --methods compact-base,compact --base /tmp/base-checkout [--remove 10]

Every child runs with one thread (OMP/BLAS); run the benchmark itself under `nice`. A child whose resident
memory passes `--max-rss-mb` (default 6144) is killed and its row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

from indexer.shards import write_shard  # noqa: E402
from indexer.store import VectorSet  # noqa: E402

SHARD = 50_000  # rows per generated shard
METHODS = ("cli", "stream", "compact", "compact-base")
COMPACTS = ("compact", "compact-base")
MB = 2**20

PROBE = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('peak_kb=' + line.split()[1] + '\\n')\n"
    "atexit.register(_peak)\n"
    "if sys.argv[1].startswith('compact'):\n"
    "    import indexer\n"
    "    from indexer.index_dir import compact_index_dir\n"
    "    sys.stderr.write('code=' + indexer.__file__ + '\\n')\n"
    "    compact_index_dir(sys.argv[3])\n"
    "    sys.exit(0)\n"
    "if sys.argv[1] == 'remove':\n"
    "    from indexer.index_dir import remove_from_index_dir\n"
    "    every = int(sys.argv[4])\n"
    "    remove_from_index_dir(sys.argv[3], lambda idx: idx.live_ids % every == 0)\n"
    "    sys.exit(0)\n"
    "if sys.argv[1] == 'cli':\n"
    "    from retrieval.cli.main import main\n"
    "    sys.exit(main(['index', 'build', '--vectors', sys.argv[2], '--index', sys.argv[3], '--kind', sys.argv[4]]))\n"
    "from indexer.config import IndexConfig\n"
    "from indexer.streaming import build_from_vectors\n"
    "build_from_vectors(sys.argv[3], sys.argv[2], IndexConfig(kind=sys.argv[4], gpu=False))\n"
)


def parse_cells(text: str, methods: list[str] | None = None) -> list[tuple[int, int, list[str], list[str]]]:
    """'100000x256:flat,auto;1000000x256:auto:stream' -> [(100000, 256, ['flat', 'auto'], methods),
    (1000000, 256, ['auto'], ['stream'])]: N x d : kinds [: methods of this cell, else `methods`]."""
    cells = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        size, _, rest = part.partition(":")
        kinds, _, only = rest.partition(":")
        n, _, d = size.lower().partition("x")
        if not n or not d or not kinds:
            raise SystemExit(f"--cells: {part!r} is not NxD:kind[,kind...][:method[,method...]]")
        chosen = [m for m in only.split(",") if m] or list(methods or METHODS)
        cells.append((int(float(n)), int(d), [k for k in kinds.split(",") if k], chosen))
    return cells


def fingerprint(d: int) -> dict[str, Any]:
    return {"encoder": "bench-clustered", "arch": "bench", "weights_sha256": None, "dim": d, "preprocess": {}}


def write_folder(folder: Path, n: int, d: int, seed: int = 1, shard: int = SHARD) -> int:
    """n clustered unit vectors of d dims as Parquet shards of `shard` rows; returns the bytes written.

    Generated shard by shard: this process holds one shard at a time, never the n vectors."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345 + d).standard_normal((1000, d), dtype=np.float32)
    fp, spec = fingerprint(d), {"name": "bench-clustered"}
    for k, start in enumerate(range(0, n, shard)):
        m = min(shard, n - start)
        block = centres[rng.integers(0, 1000, m)] + 0.5 * rng.standard_normal((m, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        j = np.arange(start, start + m)
        rows = pd.DataFrame(
            {
                "id": [f"case{i:07d}.png" for i in j],
                "path": [f"archive/case{i:07d}.png" for i in j],
                "label": np.array(["normal", "mild", "moderate", "severe"])[j % 4],
                "patient_id": [f"P{i // 6:07d}" for i in j],
            }
        )
        write_shard(folder / f"part-{k:05d}.parquet", VectorSet(rows, block, fp, spec), j.astype(np.int64))
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def index_file_bytes(index: Path) -> int:
    """Bytes of the FAISS file the index's manifest names."""
    manifest = json.loads((index / "manifest.json").read_text())
    return (index / manifest["index_file"]["name"]).stat().st_size


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_build(
    method: str,
    folder: Path,
    index: Path,
    kind: str,
    timeout: float,
    base: Path | None = None,
    max_rss_mb: float = 6144.0,
) -> dict[str, Any]:
    """One build (or compact) process: wall s, CPU s, peak RSS MB (its own VmHWM), FAISS file MB; or why it
    did not finish. `compact-base` runs the code of the checkout `base`. Killed past `max_rss_mb` of RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = base if method == "compact-base" and base is not None else ROOT
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", PROBE, method, str(folder), str(index), kind]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env, cwd=code)
        over = None
        while proc.poll() is None:
            time.sleep(0.1)
            if _rss_mb(proc.pid) > max_rss_mb:
                over = f"killed: resident memory over {max_rss_mb:.0f} MB"
            elif time.perf_counter() - t0 > timeout:
                over = f"over {timeout:.0f} s"
            if over:
                proc.kill()
                proc.wait()
                return {"skipped": over}
        err.seek(0)
        stderr = err.read()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("peak_kb=", "code="))]
        return {"skipped": f"failed (exit {proc.returncode}): {(lines or ['?'])[-1][:200]}"}
    peaks = [int(ln.split("=")[1]) for ln in stderr.splitlines() if ln.startswith("peak_kb=")]
    manifest = json.loads((index / "manifest.json").read_text())
    out = {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_mb": peaks[-1] / 1024 if peaks else float("nan"),
        "index_mb": index_file_bytes(index) / MB,
        "resolved": manifest.get("kind"),
        "factory": (manifest.get("params") or {}).get("factory"),
        "shards": len(manifest.get("shards") or []),
    }
    used = [ln.split("=", 1)[1] for ln in stderr.splitlines() if ln.startswith("code=")]
    if used:
        out["code"] = str(Path(used[-1]).parents[1])  # the checkout whose indexer ran
        out.update(checkout_state(Path(out["code"])))
        out["count"] = manifest.get("count")
    return out


def prepare_compact(folder: Path, index: Path, kind: str, remove: int, timeout: float) -> dict[str, Any]:
    """The index compact works on: a streaming build of the folder, then every `remove`-th row id removed."""
    built = run_build("stream", folder, index, kind, timeout)
    if "skipped" in built:
        return built
    removed = run_build("remove", folder, index, str(remove), timeout)
    if "skipped" in removed:
        return removed
    manifest = json.loads((index / "manifest.json").read_text())
    return {"build": built, "remove_peak_mb": removed["peak_mb"], "removed": len(manifest["removed"])}


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """overhead = peak - FAISS file; growth = overhead - the same (method, kind, d)'s overhead at the smallest N."""
    for r in rows:
        if "peak_mb" in r:
            r["overhead_mb"] = r["peak_mb"] - r["index_mb"]
    base: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in sorted((r for r in rows if "overhead_mb" in r), key=lambda r: (r["n"], r["d"])):
        key = (r["method"], r["kind"], r["d"])
        if key not in base:
            base[key] = r
        b = base[key]
        r["overhead_growth_mb"] = r["overhead_mb"] - b["overhead_mb"]
        r["growth_vs"] = f"{b['n']}x{b['d']}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | d | vectors MB | method | kind | built as | wall s | CPU s | peak RSS MB | FAISS file MB "
        "| overhead MB (peak - file) | overhead growth MB |"
    )
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        cell = f"| {r['n']:,} | {r['d']} | {r['vectors_mb']:.0f} | {r['method']} | {r['kind']} |"
        if "skipped" in r:
            lines.append(cell + f" not run: {r['skipped']} |" + " |" * 6)
            continue
        growth = (
            f"{r['overhead_growth_mb']:+.0f} (vs {r['growth_vs']})" if r["growth_vs"] != f"{r['n']}x{r['d']}" else "-"
        )
        lines.append(
            cell + f" {r['factory']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['index_mb']:.0f} "
            f"| {r['overhead_mb']:.0f} | {growth} |"
        )
    return "\n".join(lines)


def checkout_state(folder: Path) -> dict[str, object]:
    """The commit a checkout is at and whether it held uncommitted changes (`git`; empty where it is no checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return {}
    if head.returncode != 0:
        return {}
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cells",
        default="10000x256:flat;100000x256:flat,auto,hnsw;100000x1280:flat,auto;1000000x256:flat;1000000x256:auto:stream",
        help="N x d : kinds [: methods]; cells separated by ';' (the vectors of one size are written once)",
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for one build process")
    ap.add_argument("--work", type=Path, default=None, help="folder for the vectors and indexes (a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build.json")
    ap.add_argument("--base", type=Path, default=None, help="checkout whose code `compact-base` runs")
    ap.add_argument("--remove", type=int, default=10, help="compact: every REMOVE-th row id is removed first")
    ap.add_argument("--max-rss-mb", type=float, default=6144.0, help="kill a child past this resident memory")
    args = ap.parse_args(argv)
    cells = parse_cells(args.cells, [m for m in args.methods.split(",") if m])
    bad = sorted({m for cell in cells for m in cell[3] if m not in METHODS})
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if any("compact-base" in cell[3] for cell in cells) and not (args.base and (args.base / "indexer").is_dir()):
        raise SystemExit("--methods compact-base: give --base DIR, a checkout with indexer/ (e.g. a git worktree)")
    t_start = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-build-", dir=args.work) as tmp:
        work = Path(tmp)
        for n, d, kinds, methods in cells:
            folder = work / f"vectors-{n}x{d}"  # kept for later cells of the same size
            if folder.is_dir():
                shards_bytes = sum(p.stat().st_size for p in folder.glob("*.parquet"))
            else:
                t0 = time.perf_counter()
                shards_bytes = write_folder(folder, n, d)
                gen_s = time.perf_counter() - t0
                print(
                    f"cell {n}x{d}: {shards_bytes / MB:.0f} MB of shards in {gen_s:.0f} s", file=sys.stderr, flush=True
                )
            for kind in kinds:
                prepared, ready = work / f"index-{n}x{d}-{kind}-removed", None
                for method in methods:
                    index = work / f"index-{n}x{d}-{kind}-{method}"
                    r = {"n": n, "d": d, "kind": kind, "method": method, "vectors_mb": n * d * 4 / MB}
                    r["shards_mb"] = shards_bytes / MB
                    if method in COMPACTS:
                        if ready is None:
                            ready = prepare_compact(folder, prepared, kind, args.remove, args.timeout)
                        if "skipped" in ready:
                            r["skipped"] = f"preparing the index: {ready['skipped']}"
                        else:
                            r.update(removed=ready["removed"], remove_peak_mb=ready["remove_peak_mb"])
                            shutil.copytree(prepared, index)  # every compact on a fresh copy
                            r.update(run_build(method, folder, index, kind, args.timeout, args.base, args.max_rss_mb))
                    else:
                        r.update(run_build(method, folder, index, kind, args.timeout, None, args.max_rss_mb))
                    rows.append(r)
                    shutil.rmtree(index, ignore_errors=True)
                    brief = (
                        r.get("skipped")
                        or f"peak {r['peak_mb']:.0f} MB, file {r['index_mb']:.0f} MB, {r['wall_s']:.0f} s"
                    )
                    print(f"  {n}x{d} {kind} {method}: {brief}", file=sys.stderr, flush=True)
                shutil.rmtree(prepared, ignore_errors=True)
    add_overheads(rows)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1},
        "load_avg_at_end": os.getloadavg(),
        "seconds": time.time() - t_start,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    md = table(rows) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
