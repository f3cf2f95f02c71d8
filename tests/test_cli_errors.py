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


# --- F4: wrongly typed or non-UTF-8 YAML -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        (b"epochs: many\n", "epochs: expected a whole number, got 'many'"),
        (b"epochs: 1.5\n", "epochs: expected a whole number, got 1.5"),
        (b"image_size: [32]\n", "image_size: expected a whole number, got [32]"),
        (b"lr: fast\n", "lr: expected a number, got 'fast'"),
        (b"balanced: 3\n", "balanced: expected true or false, got 3"),
        (b"head_dims: 128\n", "head_dims: expected a list (a whole number), got 128"),
        (b"method: supervised\n\xff\xfe: x\n", "not UTF-8 text (byte 0xff at offset 19)"),
    ],
)
def test_train_config_with_a_wrong_type_names_file_key_and_type(tmp_path, capsys, tiny, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text)
    out = tmp_path / "t.safetensors"
    code, _, err = run_cli(capsys, "train", tiny[0], "-m", "supervised", "-o", out, "--config", cfg)
    assert code == 2
    assert_one_line_error(err, f"--config {cfg}: {needle}")
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("args", [["--lr", "-1"], ["--config", "{cfg}"]])
def test_a_negative_learning_rate_is_refused_before_training(tmp_path, capsys, tiny, args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: -1\n")
    argv = [a.format(cfg=cfg) for a in args]
    code, _, err = run_cli(capsys, "train", tiny[0], "-m", "supervised", "-o", tmp_path / "t.safetensors", *argv)
    assert code == 2
    assert_one_line_error(err, "--lr -1.0: the learning rate must be a number, 0 or more")


def test_shipped_configs_still_load():
    from retrieval.config import load_recipe
    from retrieval.training.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted((root / "train").glob("*.yaml")):
        load_train_config(f)
    for f in sorted((root / "index").glob("*.yaml")):
        load_recipe(f)


@pytest.mark.parametrize(
    "text, needle",
    [
        (b"index:\n  kind: 5\n", "index.kind: expected text, got 5"),
        (b"batch_size: many\n", "batch_size: expected a whole number, got 'many'"),
        (b"batch_size: 0\n", "batch_size 0: must be at least 1"),
        (b"preprocess:\n  image_size: big\n", "preprocess.image_size: expected a whole number, got 'big'"),
        (b"preprocess:\n  ct_window: [1]\n", "preprocess.ct_window: expected a list of 2 (a number), got [1]"),
        (b"encoder: [1, 2]\n", "encoder: expected a mapping of options, got [1, 2]"),
        (b"encoder:\n  nme: cnn5\n", "encoder: unknown option(s) nme"),
        (b"index:\n  kind: flat\n\xff: 1\n", "not UTF-8 text (byte 0xff at offset 20)"),
    ],
)
def test_index_build_recipe_with_a_wrong_type(tmp_path, capsys, tiny, text, needle):
    cfg = tmp_path / "r.yaml"
    cfg.write_bytes(text)
    code, _, err = run_cli(capsys, "index", "build", tiny[0], "-i", tmp_path / "idx", "--config", cfg, "-q")
    assert code == 2
    assert_one_line_error(err, f"--config {cfg}: {needle}")
    assert not (tmp_path / "idx").exists()


def test_a_folder_as_config_says_so(tmp_path, capsys, tiny):
    code, _, err = run_cli(capsys, "train", tiny[0], "-o", tmp_path / "t.safetensors", "--config", tmp_path)
    assert code == 2
    assert_one_line_error(err, f"--config {tmp_path}: is a folder")


# --- F5: --image-size has an upper bound -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["embed", "index build", "train"])
def test_an_absurd_image_size_is_refused_at_once(tmp_path, capsys, tiny, command):
    from retrieval.config import MAX_IMAGE_SIZE

    big = str(MAX_IMAGE_SIZE + 1)
    args = {
        "embed": ["embed", tiny[0], "-o", tmp_path / "v.parquet", "-e", "cnn5", "-q"],
        "index build": ["index", "build", tiny[0], "-i", tmp_path / "idx", "-e", "cnn5", "-q"],
        "train": ["train", tiny[0], "-m", "supervised", "-o", tmp_path / "t.safetensors", "-q"],
    }[command]
    code, _, err = run_cli(capsys, *args, "--image-size", "100000")
    assert code == 2
    assert_one_line_error(err, "--image-size 100000: at most 4096 pixels")
    code, _, err = run_cli(capsys, *args, "--image-size", big)
    assert code == 2
    assert list(tmp_path.iterdir()) == []


# --- F6: messages that name what the user gave, options refused where they were ignored ---------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from retrieval.encoders import create_encoder, save_checkpoint

    return save_checkpoint(create_encoder("cnn5"), tmp_path_factory.mktemp("ck") / "enc.safetensors")


def test_a_bad_checkpoint_is_named_as_given(tmp_path, capsys, tiny, checkpoint):
    png = tiny[0] / "a" / "a0.png"
    code, _, err = run_cli(capsys, "classify", png, "--checkpoint", png, "--anchors", tiny[0])
    assert code == 2
    assert_one_line_error(err, f"checkpoint {png}: not a retrieve checkpoint")
    code, _, err = run_cli(capsys, "classify", png, "--checkpoint", tiny[1], "--anchors", tiny[0])
    assert code == 2
    assert_one_line_error(err, f"checkpoint {tiny[1]}: a folder without encoder.safetensors")
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(checkpoint.read_bytes())
    code, _, err = run_cli(capsys, "embed", tiny[0], "-o", tmp_path / "v.parquet", "-e", lone, "-q")
    assert code == 2
    assert_one_line_error(err, f"checkpoint {lone}: lone.json is missing beside it")


@pytest.mark.parametrize("shots", ["0", "-1"])
def test_classify_refuses_shots_below_one(capsys, tiny, checkpoint, shots):
    code, _, err = run_cli(
        capsys, "classify", tiny[0] / "a" / "a0.png", "--checkpoint", checkpoint, "--anchors", tiny[0], "--shots", shots
    )
    assert code == 2
    assert_one_line_error(err, f"--shots {shots}: must be at least 1")


def test_classify_says_when_the_anchors_could_not_be_read(tmp_path, capsys, tiny, checkpoint):
    for name in ("zero.png", "text.png"):
        (tmp_path / "anchors" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "anchors" / "a" / name).write_bytes(b"" if name == "zero.png" else b"not an image")
    (tmp_path / "anchors" / "b").mkdir()
    (tmp_path / "anchors" / "b" / "bad.png").write_bytes(b"garbage")
    code, _, err = run_cli(
        capsys, "classify", tiny[0] / "a" / "a0.png", "--checkpoint", checkpoint, "--anchors", tmp_path / "anchors"
    )
    assert code == 2
    assert_one_line_error(err, "anchors of at least two classes are needed; 3 anchor image(s) could not be read")


def test_query_refuses_negative_workers(capsys, tiny):
    code, _, err = run_cli(capsys, "query", tiny[0] / "a" / "a0.png", "-i", tiny[1], "--workers", "-2", "-q")
    assert code == 2
    assert_one_line_error(err, "--workers -2: must be 0")


def test_eval_checks_its_data_root(tmp_path, capsys, tiny):
    code, _, err = run_cli(capsys, "eval", "-i", tiny[1], "--data-root", tmp_path / "nonexist", "-q")
    assert code == 2
    assert_one_line_error(err, "--data-root", "no such folder")


@pytest.mark.parametrize("where", ["manifest", "labels"])
@pytest.mark.parametrize(
    "extra, needle",
    [
        ("", "line 2 has 4 fields, the header 2 (path, label); quote a value"),  # pandas would shift the columns
        ("a/a1.png,a\n", "line 3, saw 4"),  # pandas's own ParserError, one line too
    ],
)
def test_a_csv_row_with_more_fields_than_its_header_is_refused(tmp_path, capsys, tiny, where, extra, needle):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n" + extra + "a/a0.png,a,extra,cols\n")
    (tmp_path / "a").symlink_to(tiny[0] / "a")
    args = [csv] if where == "manifest" else [tiny[0], "--labels", csv]
    code, _, err = run_cli(capsys, "index", "build", *args, "-i", tmp_path / "idx", *SMALL)
    assert code == 2
    assert_one_line_error(err, needle)
    assert not (tmp_path / "idx").exists()


def test_a_trailing_comma_does_not_shift_a_manifest(tmp_path):
    from retrieval.data.dataset import load_dataset

    write_png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "m.csv").write_text("path,label\nx.png,normal,\n")
    rows = load_dataset(tmp_path / "m.csv").rows
    assert rows["label"].tolist() == ["normal"]


def test_a_manifest_giving_one_image_two_labels_is_refused(tmp_path, capsys, tiny):
    (tmp_path / "a").symlink_to(tiny[0] / "a")
    (tmp_path / "m.csv").write_text("path,label\na/a0.png,a\na/a1.png,a\na/a0.png,b\n")
    code, _, err = run_cli(capsys, "index", "build", tmp_path / "m.csv", "-i", tmp_path / "idx", *SMALL)
    assert code == 2
    assert_one_line_error(err, "a/a0.png is listed twice with two different labels ('a', 'b')")
    (tmp_path / "m.csv").write_text("path,label\na/a0.png,a\na/a1.png,a\na/a0.png,a\n")  # the same twice: a warning
    code, _, err = run_cli(capsys, "index", "build", tmp_path / "m.csv", "-i", tmp_path / "idx", *SMALL)
    assert code == 0, err
    assert "listed twice" in err


def test_a_kind_faiss_cannot_parse_names_no_dimension(tmp_path, capsys, tiny):
    code, _, err = run_cli(capsys, "index", "build", tiny[0], "-i", tmp_path / "idx", "--kind", "bogus", *SMALL)
    assert code == 2
    assert_one_line_error(err, "--kind 'bogus': FAISS rejects it (could not parse")
    assert "-d vectors" not in err


def test_relocate_checks_every_indexed_file_and_says_it_once(tmp_path, capsys, tiny, index_copy):
    """b) A new root holding the sampled files but not all of them was accepted; e) the result printed twice."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny[0], partial)
    (partial / "c" / "c2.png").unlink()
    before = _hashes(index_copy)
    code, out, err = run_cli(capsys, "index", "relocate", "-i", index_copy, "--data-root", partial)
    assert code == 2
    assert_one_line_error(err, f"--data-root {partial}: 1 of the 9 indexed files are not in it (first: c/c2.png)")
    assert _hashes(index_copy) == before
    shutil.copy(tiny[0] / "c" / "c2.png", partial / "c" / "c2.png")
    code, out, err = run_cli(capsys, "index", "relocate", "-i", index_copy, "--data-root", partial)
    assert code == 0, err
    assert str(partial.resolve()) in out and "data root" not in err


# --- F7: cosmetics -----------------------------------------------------------------------------------------


def test_a_foreign_manifest_is_described_without_python_text(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"name": "npm-ish", "version": "1"}')
    before = _hashes(tmp_path)
    code, _, err = run_cli(capsys, "index", "compact", "-i", tmp_path)
    assert code == 2
    assert_one_line_error(err, "not a retrieve index manifest (it has no count, dim")
    assert "__init__" not in err and "positional" not in err
    assert _hashes(tmp_path) == before


def test_a_where_on_a_column_without_values_says_so(capsys, tiny):
    code, _, err = run_cli(
        capsys, "query", tiny[0] / "a" / "a0.png", "-i", tiny[1], "--where", "patient_id=nope", "-k", "3", "-q"
    )
    assert code == 2
    assert_one_line_error(err, "unknown patient_id 'nope' (no indexed image has a value in it)")


def test_a_folder_as_labels_says_so(tmp_path, capsys, tiny):
    code, _, err = run_cli(capsys, "eval", "-i", tiny[1], "--labels", tmp_path, "-q")
    assert code == 2
    assert_one_line_error(err, f"--labels {tmp_path}: is a folder")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["embed", "{data}", "-e", "cnn5", "-q", "-o", "{tmp}/v.txt"], "give a .parquet file"),
        (["suggest-labels", "-i", "{index}", "--budget", "2", "-o", "{tmp}/s.parquet"], "give a .csv file"),
    ],
    ids=["embed", "suggest-labels"],
)
def test_an_output_suffix_that_does_not_match_what_is_written_is_refused(tmp_path, capsys, tiny, args, needle):
    """c) embed -o v.txt wrote Parquet into v.txt; suggest-labels -o s.parquet wrote CSV."""
    argv = [a.format(data=tiny[0], index=tiny[1], tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, "--out", needle)
    assert list(tmp_path.iterdir()) == []


def test_embed_never_replaces_a_file_that_is_not_its_own(tmp_path, capsys, tiny):
    """`embed -o` replaces an earlier run's vectors file, but a Parquet file of the user's (or any other file
    with that suffix) is refused before any work and left byte for byte."""
    import pandas as pd

    theirs = tmp_path / "theirs.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(theirs)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    for target in (theirs, junk):
        before = target.read_bytes()
        code, _, err = run_cli(capsys, "embed", tiny[0], "-o", target, "-e", "cnn5", "--image-size", "32", "-q")
        assert code == 2
        assert_one_line_error(err, f"--out {target}: exists and is not a vectors file written by `retrieve embed`")
        assert target.read_bytes() == before
    ours = tmp_path / "v.parquet"
    for _ in range(2):  # the second run replaces the first's vectors
        code, _, err = run_cli(capsys, "embed", tiny[0], "-o", ours, "-e", "cnn5", "--image-size", "32", "-q")
        assert code == 0, err
