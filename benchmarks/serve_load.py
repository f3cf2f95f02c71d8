"""Load benchmark of `retrieve serve`: latency and throughput of POST /query at 1, 8 and 32 concurrent clients.

Loopback only: the script starts its own server (`retrieve serve`, a separate process, with an access
token) on a free 127.0.0.1 port and talks to nothing else. Bounded: at most --requests queries per
level (or --total split over the levels) and --max-seconds per level. Every answer is checked (HTTP 200
and k results); anything else counts as an error. Baselines measured in the same run: the same query
as a direct library call in this process (encoder loaded once, no HTTP), and GET /health at 8 clients
(HTTP alone, no model). The server inherits this process's environment: set OMP_NUM_THREADS to give
both the same torch threads (on a busy 2-core machine 2 threads spin against other jobs and one query
can take 15x longer than with 1).

    python benchmarks/serve_load.py [--index retrieve-demo/index] [--images retrieve-demo/data]
        [--levels 1,8,32] [--requests 200 | --total 10000] [--max-seconds 600] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.server.run import free_port  # noqa: E402

TOKEN_ENV = "RETRIEVE_BENCH_TOKEN"


def pick_images(folder: Path, n: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    if not files:
        raise SystemExit(f"--images {folder}: no PNG, JPEG or DICOM files")
    step = max(1, len(files) // n)
    return files[::step][:n]


def library_baseline(index: Path, files: list[Path], k: int, repeats: int) -> dict:
    """The same queries as direct library calls (what `retrieve query` does once the model is loaded)."""
    from indexer.index_dir import open_index_dir, read_manifest
    from retrieval.pipeline import encoder_for_index, query_files

    m = read_manifest(index)
    loaded = encoder_for_index(m.fingerprint, m.encoder_spec, str(index))
    idx = open_index_dir(index, use_gpu=False)
    times = []
    for j in range(repeats + 1):
        path = files[j % len(files)]
        t0 = time.perf_counter()
        res, errors = query_files(idx, loaded, [str(path)], k)
        if errors or len(res[0].hits) != k:
            raise SystemExit(f"library baseline failed on {path}: {errors}")
        if j:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return summary(times, repeats, {}, sum(times), concurrency=1)


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def summary(latencies: list[float], requests: int, errors: Counter, wall: float, concurrency: int) -> dict:
    lat = np.asarray(latencies) * 1000.0
    return {
        "clients": concurrency,
        "requests": requests,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "requests_per_s": round(requests / wall, 2) if wall > 0 else None,
        "wall_s": round(wall, 1),
    }


async def load_level(
    url: str, token: str, images: list[tuple[str, bytes]], clients: int, n: int, max_s: float, k: int, path: str
) -> dict:
    latencies: list[float] = []
    errors: Counter = Counter()
    counter = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        t_start = time.perf_counter()
        deadline = t_start + max_s

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= n or time.perf_counter() > deadline:
                    return
                name, data = images[i % len(images)]
                t0 = time.perf_counter()
                try:
                    if path == "/health":
                        r = await client.get("/health")
                        ok = r.status_code == 200
                    else:
                        r = await client.post("/query", files={"file": (name, data)}, data={"k": str(k)})
                        body = r.json() if r.status_code == 200 else None
                        ok = isinstance(body, dict) and len(body.get("results", [])) == k
                except Exception as exc:  # a refused or dropped connection is an error of the run, counted
                    errors[type(exc).__name__] += 1
                    continue
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[f"HTTP {r.status_code}"] += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t_start
    done = len(latencies) + sum(errors.values())
    out = summary(latencies, done, errors, wall, clients)
    out["stopped_by_time"] = done < n
    return out


def start_server(index: Path, port: int, token: str, max_concurrent: int, log: Any) -> subprocess.Popen:
    """`retrieve serve` in its own process; its output (one access-log line a request) goes to the file `log`."""
    cmd = [
        sys.executable,
        "-c",
        "from retrieval.cli.main import main; main()",
        "serve",
        "--index",
        str(index),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--token-env",
        TOKEN_ENV,
        "--max-concurrent",
        str(max_concurrent),
        "--no-gpu",
    ]
    env = {**os.environ, TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, log: Any, timeout: float = 300.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"retrieve serve exited with {proc.returncode} before answering: {tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"retrieve serve did not answer within {timeout:.0f} s")


def table(rows: list[dict]) -> str:
    lines = [
        "| what | clients | requests | errors | p50 ms | p95 ms | requests/s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} "
            f"| {r['requests_per_s']} | {r['wall_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=Path("retrieve-demo/index"))
    ap.add_argument("--images", type=Path, default=Path("retrieve-demo/data"), help="query images (a sample is used)")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=200, help="queries per level")
    ap.add_argument("--total", type=int, default=None, help="queries in all, split evenly over the levels")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="time bound per level")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n-images", type=int, default=16, help="distinct query images, cycled")
    ap.add_argument("--baseline-repeats", type=int, default=30)
    ap.add_argument("--max-concurrent", type=int, default=64, help="the server's bound on queries in flight")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    per_level = [args.requests] * len(levels)
    if args.total:
        per_level = [args.total // len(levels) + (1 if j < args.total % len(levels) else 0) for j in range(len(levels))]
    files = pick_images(args.images, args.n_images)
    images = [(p.name, p.read_bytes()) for p in files]

    t = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    base = library_baseline(args.index, files, args.k, args.baseline_repeats)
    print(f"library baseline: p50 {base['p50_ms']} ms over {args.baseline_repeats} queries", flush=True)

    token = secrets.token_urlsafe(32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = start_server(args.index, port, token, args.max_concurrent, log)
    rows: list[dict[str, Any]] = [{"what": "library call, no HTTP (baseline)", **base}]
    try:
        startup = wait_ready(url, proc, log)
        print(f"server ready in {startup:.1f} s on {url}", flush=True)
        health = asyncio.run(load_level(url, token, images, 8, 500, args.max_seconds, args.k, "/health"))
        rows.append({"what": "GET /health (HTTP only, baseline)", **health})
        for clients, n in zip(levels, per_level):
            r = asyncio.run(load_level(url, token, images, clients, n, args.max_seconds, args.k, "/query"))
            rows.append({"what": "POST /query", **r})
            print(
                f"{clients} clients: {r['requests']} requests, {r['errors']} errors, p50 {r['p50_ms']} ms, "
                f"p95 {r['p95_ms']} ms, {r['requests_per_s']} req/s",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    from indexer.index_dir import read_manifest

    m = read_manifest(args.index)
    queries = [r for r in rows if r["what"] == "POST /query"]
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "index": {
            "path": str(args.index),
            "count": m.count,
            "dim": m.dim,
            "kind": m.kind,
            "encoder": m.encoder_spec.get("name"),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": load_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nice": os.nice(0),
        },
        "server_startup_s": round(startup, 1),
        "total_queries": sum(r["requests"] for r in queries),
        "total_errors": sum(r["errors"] for r in queries),
        "total_wall_s": round(time.perf_counter() - t, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\n{result['total_queries']} queries, {result['total_errors']} errors; results -> {args.out}")
    if result["total_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
