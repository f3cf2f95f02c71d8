"""Concurrent writers queue on the lock and every row lands; readers always see one whole version."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from budget import scale

from indexer.config import IndexConfig
from indexer.index_dir import build_index_dir, open_index_dir, verify_index_dir

pytestmark = pytest.mark.reliability
WORKER = Path(__file__).with_name("worker.py")
sys.path.insert(0, str(WORKER.parent))
from worker import vectors  # noqa: E402


def _read_loop(folder: Path, allowed_counts: set[int], stop: threading.Event, seen: list, problems: list) -> None:
    """Open the index again and again while writers run; every open must be one whole version."""
    while not stop.is_set():
        try:
            idx = open_index_dir(folder, use_gpu=False)
            n = len(idx.rows)
            if n != idx.index.ntotal or n != idx.manifest.count or n not in allowed_counts:
                problems.append(f"inconsistent read: {n} rows, {idx.index.ntotal} in FAISS")
            seen.append(n)
        except Exception as exc:  # any error while writers run is a failure
            problems.append(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_concurrent_adds_all_land_and_readers_see_whole_versions(tmp_path):
    rounds, writers, per_writer, base = scale(2, 15), 4, 500, 100
    reads = errors = 0
    for r in range(rounds):
        folder = tmp_path / f"r{r}"
        build_index_dir(folder, vectors(base, 0), IndexConfig(kind="flat", gpu=False))
        allowed_counts = {base + j * per_writer for j in range(writers + 1)}
        stop = threading.Event()
        seen: list[int] = []
        problems: list[str] = []

        reader = threading.Thread(target=_read_loop, args=(folder, allowed_counts, stop, seen, problems))
        reader.start()
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), "add", str(folder), str(per_writer), str(1_000_000 * (w + 1))],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for w in range(writers)
        ]
        codes = [p.wait(timeout=300) for p in procs]
        stop.set()
        reader.join()
        assert codes == [0] * writers, [p.stderr.read() for p in procs if p.stderr]
        final = open_index_dir(folder, use_gpu=False)
        expected = {f"img{j}" for j in range(base)} | {
            f"img{1_000_000 * (w + 1) + j}" for w in range(writers) for j in range(per_writer)
        }
        assert set(final.rows["id"]) == expected and len(final.rows) == len(expected)
        assert verify_index_dir(folder) == []
        assert not problems, problems[:3]
        reads += len(seen)
        errors += len(problems)
    print(json.dumps({"concurrency_rounds": rounds, "writers_per_round": writers, "reads": reads, "errors": errors}))
