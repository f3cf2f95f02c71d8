"""kill -9 at random points of index build, add, overwrite, remove and compact: the index is always the old
or the new one."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from budget import scale

from indexer.config import IndexConfig
from indexer.errors import RetrieveError
from indexer.index_dir import (
    add_to_index_dir,
    build_index_dir,
    open_index_dir,
    read_manifest,
    remove_from_index_dir,
    verify_index_dir,
)
from indexer.search import search

pytestmark = pytest.mark.reliability
WORKER = Path(__file__).with_name("worker.py")
BASE, NEW = 2_000, 20_000  # NEW rows make a write take a few hundred ms, so kills land inside it
sys.path.insert(0, str(WORKER.parent))
from worker import config, vectors  # noqa: E402

STORED = 20_000  # rows of the index that remove and compact work on (row ids 0..STORED-1)
GONE = 6_000  # remove: the worker removes row ids 0..GONE-1; compact: they were removed before it starts


def _start(action: str, folder: Path, n: int, start: int) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, str(WORKER), action, str(folder), str(n), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    return p


def _duration(tmp: Path, action: str) -> float:
    """How long the write itself takes on this machine (ready -> exit), to spread the kills over it."""
    folder = tmp / f"calibrate-{action}"
    if action not in ("build", "stream"):
        build_index_dir(folder, vectors(BASE, 0), IndexConfig(kind="flat", gpu=False))
    p = _start(action, folder, NEW, 10_000_000)
    t0 = time.perf_counter()
    assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    return time.perf_counter() - t0


def _ids(folder: Path) -> set[str]:
    return set(open_index_dir(folder, use_gpu=False).rows["id"])


@pytest.mark.slow
def test_kill_9_never_loses_an_index(tmp_path):
    rng = random.Random(20261201)
    windows = {a: _duration(tmp_path, a) for a in ("build", "add", "overwrite")}
    trials = scale(9, 120)
    outcomes: dict[str, dict[str, int]] = {a: {"old": 0, "new": 0} for a in windows}
    for t in range(trials):
        action = ("build", "add", "overwrite")[t % 3]
        folder = tmp_path / f"t{t}"
        base = {f"img{j}" for j in range(BASE)}
        new = {f"img{j}" for j in range(1_000_000, 1_000_000 + NEW)}
        if action != "build":
            build_index_dir(folder, vectors(BASE, 0), IndexConfig(kind="flat", gpu=False))
        p = _start(action, folder, NEW, 1_000_000)
        time.sleep(rng.uniform(0, windows[action] * 1.1))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        if action == "build":
            try:
                read_manifest(folder)
                got = _ids(folder)
            except RetrieveError:
                got = set()  # the first build never committed: nothing existed before it either
            assert got in (set(), new), (t, action, len(got))
            outcomes[action]["new" if got else "old"] += 1
            # an interrupted first build is rebuilt without --overwrite
            build_index_dir(folder, vectors(10, 5_000_000), IndexConfig(kind="flat", gpu=False), overwrite=bool(got))
            continue
        got = _ids(folder)
        expected_new = base | new if action == "add" else new
        assert got in (base, expected_new), (t, action, len(got))
        outcomes[action]["new" if got == expected_new else "old"] += 1
        assert verify_index_dir(folder) == []
        m, added = add_to_index_dir(folder, vectors(5, 7_000_000))  # the lock was released by the kill
        assert added == 5 and m.count == len(got) + 5
        files = {q.name for q in folder.iterdir() if q.suffix in (".parquet", ".faiss", ".tmp")}
        assert files == set(m.file_names()), files  # the dead writer's files were collected
    print(json.dumps({"kill_trials": trials, "windows_s": windows, "outcomes": outcomes}))


@pytest.mark.parametrize("action", ["add", "overwrite"])
@pytest.mark.slow
def test_kill_9_while_a_reader_reads(tmp_path, action):
    """A reader that opened the old version keeps a consistent view while a writer dies mid-commit."""
    folder = tmp_path / "idx"
    build_index_dir(folder, vectors(BASE, 0), IndexConfig(kind="flat", gpu=False))
    reader = open_index_dir(folder, use_gpu=False)
    p = _start(action, folder, NEW, 1_000_000)
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert len(reader.rows) == BASE == reader.index.ntotal
    assert verify_index_dir(folder) == []


@pytest.mark.slow
def test_kill_9_during_a_streaming_build_then_resume(tmp_path):
    """An interrupted streaming build keeps its finished parts; --resume completes it with every row once."""
    rng = random.Random(7)
    window = _duration(tmp_path, "stream")
    trials = scale(3, 30)
    resumed_parts = 0
    for t in range(trials):
        folder = tmp_path / f"s{t}"
        p = _start("stream", folder, NEW, 1_000_000)
        time.sleep(rng.uniform(0, window * 1.1))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        resumed_parts += len(list(folder.glob("part-*.parquet")))
        done = _start("resume", folder, NEW, 1_000_000)
        assert done.wait(timeout=300) == 0, done.stderr.read() if done.stderr else ""
        rows = open_index_dir(folder, use_gpu=False).rows
        assert len(rows) == NEW and rows["id"].is_unique
        assert set(rows["id"]) == {f"img{j}" for j in range(1_000_000, 1_000_000 + NEW)}
        assert verify_index_dir(folder) == []
    print(json.dumps({"stream_kill_trials": trials, "parts_found_after_kills": resumed_parts}))


def _removal_folder(folder: Path, action: str, kind: str) -> None:
    """An index of STORED rows; for compact, its first GONE rows already removed (so compact has work)."""
    build_index_dir(folder, vectors(STORED, 0), config(kind))
    if action == "compact":
        remove_from_index_dir(folder, lambda idx: idx.live_ids < GONE)


def _check_after_removal_kill(folder: Path, action: str) -> str:
    """The index opens; every row not being removed is there and finds itself; the removed rows are all gone
    or (remove killed before its commit) all there and all found. Returns which version it is."""
    idx = open_index_dir(folder, use_gpu=False)
    kept = set(range(GONE, STORED))
    live = set(idx.live_ids.tolist())
    rows = set(idx.rows["id"])
    assert kept <= live, len(kept - live)
    if action == "remove" and live == set(range(STORED)):
        version = "old"
    else:
        assert live == kept, (action, len(live))  # never a part of the removed rows
        version = "new"
    assert rows == {f"img{j}" for j in live}
    vs = vectors(STORED, 0)
    probe = np.r_[np.arange(GONE, STORED, 37), np.arange(0, GONE, 53)]  # kept rows and removed ones
    hits = search(idx, vs.vectors[probe], k=1)
    for row, found in zip(probe, hits):
        if row in live:
            assert found and found[0].row_id == row, (row, found)  # searchable: each live row finds itself
        else:
            assert found and found[0].row_id in live and found[0].row_id != row
    m = read_manifest(folder)
    if action == "compact":
        version = "new" if not m.removed else "old"
    return version


@pytest.mark.slow
def test_kill_9_during_remove_and_compact(tmp_path):
    """remove and compact, on an exact index (FAISS removes at once) and on an IVF with on-disk lists
    (tombstones; compact writes new lists), killed at random moments of the write."""
    rng = random.Random(20261202)
    rotation = [("remove", "flat"), ("compact", "flat"), ("remove", "ivf-disk"), ("compact", "ivf-disk")]
    windows = {}
    for action, kind in rotation:  # the length of each write, uninterrupted
        folder = tmp_path / f"calibrate-{action}-{kind}"
        _removal_folder(folder, action, kind)
        p = _start(action, folder, GONE, 0)
        t0 = time.perf_counter()
        assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
        windows[f"{action}/{kind}"] = time.perf_counter() - t0
        assert _check_after_removal_kill(folder, action) == "new"
    trials = scale(4, 80)
    outcomes = {key: {"old": 0, "new": 0} for key in windows}
    for t in range(trials):
        action, kind = rotation[t % len(rotation)]
        key = f"{action}/{kind}"
        folder = tmp_path / f"r{t}"
        _removal_folder(folder, action, kind)
        p = _start(action, folder, GONE, 0)
        time.sleep(rng.uniform(0, windows[key] * 1.1))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        outcomes[key][_check_after_removal_kill(folder, action)] += 1
        assert verify_index_dir(folder) == []
        m, added = add_to_index_dir(folder, vectors(5, 7_000_000))  # the lock was released by the kill
        assert added == 5
        files = {q.name for q in folder.iterdir() if q.suffix in (".parquet", ".faiss", ".ivfdata", ".tmp")}
        assert files == set(m.file_names()), files  # the dead writer's files were collected
    print(json.dumps({"removal_kill_trials": trials, "windows_s": windows, "outcomes": outcomes}))


@pytest.mark.slow
def test_kill_9_during_an_on_disk_add(tmp_path):
    """`index add` onto on-disk lists merges the old lists and the new vectors into a new lists file; killed at any
    moment, the index holds exactly the old rows or exactly old + new, and the next write collects the leftovers."""
    rng = random.Random(11)
    calibrate = tmp_path / "calibrate"
    build_index_dir(calibrate, vectors(STORED, 0), config("ivf-disk"))
    p = _start("add", calibrate, NEW, 1_000_000)
    t0 = time.perf_counter()
    assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
    window = time.perf_counter() - t0
    base = {f"img{j}" for j in range(STORED)}
    new = {f"img{j}" for j in range(1_000_000, 1_000_000 + NEW)}
    assert _ids(calibrate) == base | new
    trials = scale(3, 40)
    outcomes = {"old": 0, "new": 0}
    for t in range(trials):
        folder = tmp_path / f"a{t}"
        build_index_dir(folder, vectors(STORED, 0), config("ivf-disk"))
        p = _start("add", folder, NEW, 1_000_000)
        time.sleep(rng.uniform(0, window * 1.1))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        got = _ids(folder)
        assert got in (base, base | new), (t, len(got))
        outcomes["new" if got != base else "old"] += 1
        assert verify_index_dir(folder) == []
        idx = open_index_dir(folder, use_gpu=False)
        probe = np.arange(0, STORED, 41)
        hits = search(idx, vectors(STORED, 0).vectors[probe], k=1)
        assert [h[0].row_id for h in hits] == probe.tolist()  # every stored row still finds itself
        m, added = add_to_index_dir(folder, vectors(5, 7_000_000))
        assert added == 5
        files = {q.name for q in folder.iterdir() if q.suffix in (".parquet", ".faiss", ".ivfdata", ".tmp")}
        assert files == set(m.file_names()), files
    print(json.dumps({"ondisk_add_kill_trials": trials, "window_s": window, "outcomes": outcomes}))
