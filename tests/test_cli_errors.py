"""The environment refuses a write (read-only or full disk, no permission, a folder where a file goes): every
command says what and where in one line and exits 2, before long work where that is cheap, and an index
already stored stays as it was. The failures are simulated (an OSError with the errno a real read-only or
full file system gives), so these run anywhere, as root or not."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, write_png

SMALL = ["-e", "cnn5", "--image-size", "32", "-q", "--no-gpu"]
EROFS = OSError(errno.EROFS, "Read-only file system")


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(data, index): 9 generated 32-px images in three class folders, indexed with cnn5 (a second's work)."""
    from retrieval.cli.main import main

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        for j in range(3):
            write_png(root / "data" / c / f"{c}{j}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    for j in range(2):
        write_png(root / "more" / "a" / f"new{j}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    assert main(["index", "build", str(root / "data"), "-i", str(root / "idx"), *SMALL]) == 0
    return root / "data", root / "idx"


@pytest.fixture
def index_copy(tiny, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny[1], tmp_path / "idx"))


def _no_evaluation(monkeypatch):
    """Fail loudly if eval starts its work: the output checks must come first."""
    import retrieval.evaluation.index_eval as index_eval

    def boom(*a, **k):
        raise AssertionError("evaluated before checking the output")

    monkeypatch.setattr(index_eval, "evaluate_index", boom)


def _read_only(monkeypatch, under: Path):
    """Every new file under `under` fails as on a read-only file system."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve().is_relative_to(under.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / "x.tmp"))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# --- F3: an output path of the wrong kind, refused before the work ------------------------------------------


def test_eval_json_at_a_folder_is_refused_before_evaluating(tmp_path, capsys, tiny, monkeypatch):
    _no_evaluation(monkeypatch)
    code, _, err = run_cli(capsys, "eval", "-i", tiny[1], "--json", tmp_path, "-q")
    assert code == 2
    assert_one_line_error(err, f"--json {tmp_path}: is a folder")


def test_eval_report_at_a_file_is_refused_before_evaluating(tmp_path, capsys, tiny, monkeypatch):
    _no_evaluation(monkeypatch)
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "eval", "-i", tiny[1], "--report", tmp_path / "afile", "-q")
    assert code == 2
    assert_one_line_error(err, "--report", "is a file; give a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_suggest_labels_out_at_a_folder_is_refused(tmp_path, capsys, tiny):
    code, _, err = run_cli(capsys, "suggest-labels", "-i", tiny[1], "--budget", "2", "-o", tmp_path)
    assert code == 2
    assert_one_line_error(err, f"--out {tmp_path}: is a folder")


def test_train_out_under_a_file_is_refused_before_training(tmp_path, capsys, tiny, monkeypatch):
    import retrieval.training.run as run

    monkeypatch.setattr(run, "train_to_checkpoint", lambda *a, **k: pytest.fail("trained first"))
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(
        capsys, "train", tiny[0], "-m", "supervised", "-e", "cnn5", "--epochs", "1", "-q",
        "-o", tmp_path / "afile" / "t.safetensors",
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "afile is a file, not a folder")


# --- F2: read-only targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--json", "--report"])
def test_eval_output_on_a_read_only_disk_is_refused_before_evaluating(tmp_path, capsys, tiny, monkeypatch, option):
    _read_only(monkeypatch, tmp_path)
    _no_evaluation(monkeypatch)
    target = tmp_path / "out" / ("e.json" if option == "--json" else "rep")
    code, _, err = run_cli(capsys, "eval", "-i", tiny[1], option, target, "-q")
    assert code == 2
    assert_one_line_error(err, f"{option} {target}: cannot write in {tmp_path}: read-only file system")


@pytest.mark.parametrize("command", ["query", "embed", "suggest-labels"])
def test_outputs_on_a_read_only_disk(tmp_path, capsys, tiny, monkeypatch, command):
    _read_only(monkeypatch, tmp_path)
    data, index = tiny
    out = tmp_path / "o.csv"
    args = {
        "query": ["query", data / "a" / "a0.png", "-i", index, "-q", "--no-gpu", "--out", out],
        "embed": ["embed", data, *SMALL, "-o", tmp_path / "v.parquet"],
        "suggest-labels": ["suggest-labels", "-i", index, "--budget", "2", "-o", out],
    }[command]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "--out", "read-only file system")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["index", "add", "{more}"],
        ["index", "remove", "--id", "a/a0.png"],
        ["index", "compact"],
        ["index", "relocate", "--data-root", "{data}"],
        ["index", "build", "{data}", "--overwrite", *SMALL],
    ],
    ids=["add", "remove", "compact", "relocate", "build-overwrite"],
)
def test_index_writers_on_a_read_only_index(tmp_path, capsys, tiny, index_copy, monkeypatch, args):
    """The write lock is the first thing a writer creates: a read-only folder is refused there, untouched."""
    import filelock

    def acquire(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(filelock.UnixFileLock, "acquire", acquire)
    before = _hashes(index_copy)
    data = tiny[0]
    argv = [a.format(more=data.parent / "more", data=data) for a in args]
    code, _, err = run_cli(capsys, *argv, "-i", index_copy)
    assert code == 2
    assert_one_line_error(err, f"--index {index_copy}: cannot take its write lock .lock: read-only file system")
    assert _hashes(index_copy) == before


def test_index_build_into_a_read_only_folder(tmp_path, capsys, tiny, monkeypatch):
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self.resolve().is_relative_to(tmp_path.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_cli(capsys, "index", "build", tiny[0], "-i", tmp_path / "new", *SMALL)
    assert code == 2
    assert_one_line_error(err, f"{tmp_path / 'new'}: read-only file system")


# --- F2: a full disk ---------------------------------------------------------------------------------------


def test_index_add_on_a_full_disk_leaves_the_index_whole(tmp_path, capsys, tiny, index_copy, monkeypatch):
    """FAISS's RuntimeError on a failed write is one line naming the index file; the index verifies, and the
    shard the failed add wrote goes with the next successful write."""
    import faiss

    real = faiss.write_index

    def full(index, path):
        raise RuntimeError(
            f"Error in void faiss::write_index at index_write.cpp:499: write error in {path}: 4051 != 512000 "
            "(No space left on device)"
        )

    monkeypatch.setattr(faiss, "write_index", full)
    before = _hashes(index_copy)
    code, _, err = run_cli(capsys, "index", "add", tiny[0].parent / "more", "-i", index_copy, "-q", "--no-gpu")
    assert code == 2
    assert_one_line_error(err, str(index_copy), ".faiss: no space left on device")
    orphans = set(_hashes(index_copy)) - set(before)
    assert orphans and all(name.startswith("shard-") for name in orphans)  # the new rows' shard, named nowhere
    assert {k: v for k, v in _hashes(index_copy).items() if k in before} == before
    monkeypatch.setattr(faiss, "write_index", real)
    assert run_cli(capsys, "index", "verify", "-i", index_copy)[0] == 0
    code, _, err = run_cli(capsys, "index", "remove", "--id", "a/a0.png", "-i", index_copy)
    assert code == 0, err
    assert not orphans & set(_hashes(index_copy))  # collected by the next write
    assert run_cli(capsys, "index", "verify", "-i", index_copy)[0] == 0


def test_a_full_disk_while_writing_names_the_target(tmp_path, capsys, tiny, monkeypatch):
    """pyarrow and plain writes raise ENOSPC without a file name: atomic_path names the file it was writing."""
    import json

    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".e.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: "{}")
    out = tmp_path / "e.json"
    code, _, err = run_cli(capsys, "eval", "-i", tiny[1], "--json", out, "-q")
    assert code == 2
    assert_one_line_error(err, f"{out}: no space left on device")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_atomic_path_names_the_target_and_leaves_nothing(tmp_path):
    from indexer.atomic import atomic_path
    from retrieval.errors import StorageError

    target = tmp_path / "v.parquet"
    with pytest.raises(StorageError, match=f"^{target}: no space left on device$"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError, match="is a folder"):
        with atomic_path(tmp_path):
            pass


# --- the one place: main() -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code_, reason",
    [
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_main_turns_an_environment_oserror_into_one_line(tmp_path, capsys, monkeypatch, code_, reason):
    def fails(*a, **k):
        raise OSError(code_, "whatever", str(tmp_path / "f"))

    monkeypatch.setattr("retrieval.cli.main.app", _app_calling(fails))
    code, _, err = run_cli(capsys, "anything")
    assert code == 2
    assert_one_line_error(err, f"{tmp_path / 'f'}: {reason}")
    assert len(err.strip().splitlines()) == 1


def test_main_still_calls_another_oserror_a_bug(capsys, monkeypatch):
    def bad(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr("retrieval.cli.main.app", _app_calling(bad))
    code, _, err = run_cli(capsys, "anything")
    assert code == 1
    assert err.startswith("internal error: OSError")


def _app_calling(fn):
    def app(*a, **k):
        fn()

    return app
