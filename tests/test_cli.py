"""Every command end to end on generated data, including the bad-input cases."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, assert_one_line_error, run_cli, write_dicom
from PIL import Image

from indexer.store import read_vectors


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_embed_writes_parquet_with_metadata(tmp_path, capsys, demo_data):
    out = tmp_path / "v.parquet"
    code, stdout, err = run_cli(capsys, "embed", demo_data, "--out", out, *FAST, "--batch-size", "5")
    assert code == 0, err
    vs = read_vectors(out)
    assert len(vs) == 24 and vs.dim == 1280
    assert {"id", "path", "label", "patient_id", "frame_index", "steatosis_grade", "gain"} <= set(vs.rows.columns)
    assert vs.fingerprint["encoder"] == "imagenet-effnet-lite0" and vs.fingerprint["preprocess"]["image_size"] == 64
    assert np.allclose(np.linalg.norm(vs.vectors, axis=1), 1, atol=1e-5)
    assert "embedded 24 images" in stdout


@pytest.mark.slow
def test_index_build_from_vectors_and_info(tmp_path, capsys, demo_data):
    v = tmp_path / "v.parquet"
    assert run_cli(capsys, "embed", demo_data, "--out", v, *FAST)[0] == 0
    idx = tmp_path / "idx"
    code, out, err = run_cli(capsys, "index", "build", "--vectors", v, "--index", idx, "--kind", "hnsw")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "index", "info", "--index", idx, "--json")
    info = json.loads(out)
    assert info["count"] == 24 and info["kind"] == "hnsw" and info["dim"] == 1280
    assert info["labels"] == {"mild": 6, "moderate": 6, "normal": 6, "severe": 6}
    assert info["fingerprint"]["encoder"] == "imagenet-effnet-lite0" and info["created"]
    code, out, _ = run_cli(capsys, "index", "info", "--index", idx)
    assert "hnsw" in out and "imagenet-effnet-lite0" in out


@pytest.mark.slow
def test_query_table_and_json(capsys, demo_index, demo_data):
    img = demo_data / "normal" / "SYN000_f0.png"
    code, out, err = run_cli(capsys, "query", img, "--index", demo_index, "--k", "4")
    assert code == 0, err
    assert "rank" in out and "vote:" in out and out.count("SYN") >= 4
    code, out, _ = run_cli(capsys, "query", img, "--index", demo_index, "--k", "5", "--json", "--vote", "similarity")
    res = json.loads(out)
    assert res["query"] == str(img)
    assert [r["rank"] for r in res["results"]] == [1, 2, 3, 4, 5]
    assert str(img.resolve()) not in [r["path"] for r in res["results"]]  # an indexed image is not its own neighbour
    code, out, _ = run_cli(capsys, "query", img, "--index", demo_index, "--k", "5", "--json", "--include-self")
    own = json.loads(out)["results"][0]
    assert own["path"] == str(img.resolve()) and own["score"] == pytest.approx(1, abs=1e-4)
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    assert {"steatosis_grade", "gain", "id", "label", "patient_id"} <= set(res["results"][0])
    v = res["vote"]
    assert v["label"] in v["votes"] and 0 < v["confidence"] <= 1


@pytest.mark.slow
def test_query_exclude_patient_where_and_several_images(capsys, demo_index, demo_data):
    a, b = demo_data / "normal" / "SYN000_f0.png", demo_data / "severe" / "SYN300_f1.png"
    code, out, err = run_cli(
        capsys,
        "query",
        a,
        b,
        "--index",
        demo_index,
        "--k",
        "6",
        "--json",
        "--exclude-patient",
        "SYN000",
        "--exclude-patient",
        "SYN300",
        "--where",
        "label=mild",
    )
    assert code == 0, err
    res = json.loads(out)
    assert len(res) == 2
    for r in res:
        assert len(r["results"]) == 6
        assert all(x["patient_id"] not in ("SYN000", "SYN300") and x["label"] == "mild" for x in r["results"])
        assert r["vote"]["label"] == "mild" and r["vote"]["confidence"] == 1


@pytest.mark.slow
def test_query_dicom_clip(tmp_path, capsys, demo_index):
    clip = np.random.default_rng(0).integers(0, 255, (3, 64, 64)).astype(np.uint16)
    dcm = write_dicom(tmp_path / "clip.dcm", clip)
    code, out, err = run_cli(capsys, "query", dcm, "--index", demo_index, "--k", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["query"] for r in res] == [f"{dcm}#{i}" for i in range(3)]


@pytest.mark.slow
def test_query_bad_inputs(tmp_path, capsys, demo_index, demo_data):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"garbage")
    good = demo_data / "mild" / "SYN100_f0.png"
    code, out, err = run_cli(capsys, "query", junk, good, "--index", demo_index, "--k", "3")
    assert code == 2 and "SYN" in out  # the readable image is still answered
    assert_one_line_error(err, "junk.png")
    code, _, err = run_cli(capsys, "query", good, "--index", demo_index, "--k", "999")
    assert code == 2
    assert_one_line_error(err, "--k 999", "24 images")
    code, _, err = run_cli(capsys, "query", good, "--index", demo_index, "--where", "label=cirrhosis")
    assert code == 2
    assert_one_line_error(err, "unknown label 'cirrhosis'")
    code, _, err = run_cli(capsys, "query", tmp_path / "absent.png", "--index", demo_index)
    assert code == 2
    assert_one_line_error(err, "absent.png", "not found")
    code, _, err = run_cli(capsys, "query", good, "--index", tmp_path / "no-index")
    assert code == 2
    assert_one_line_error(err, "no-index")


def test_other_encoder_is_refused(capsys, demo_index, demo_data):
    good = demo_data / "mild" / "SYN100_f0.png"
    code, _, err = run_cli(capsys, "query", good, "--index", demo_index, "--encoder", "cnn5")
    assert code == 2
    assert_one_line_error(err, "imagenet-effnet-lite0", "cnn5")


@pytest.mark.slow
def test_build_skips_bad_files_and_never_damages_an_index(tmp_path, capsys, demo_data):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    (data / "normal" / "broken.png").write_bytes((data / "normal" / "SYN000_f0.png").read_bytes()[:100])
    (data / "normal" / "notes.txt").write_text("not an image")
    frame = pd.read_csv(data / "labels.csv")
    extra = pd.DataFrame(
        {"path": ["normal/broken.png", "normal/notes.txt", "normal/missing.png"], "label": ["normal"] * 3}
    )
    pd.concat([frame, extra]).to_csv(data / "labels.csv", index=False)
    idx = tmp_path / "idx"
    code, out, err = run_cli(capsys, "index", "build", data, "--index", idx, *FAST)
    assert code == 0, err
    assert "indexed 24 images" in out and "skipped 3" in out
    for name in ("broken.png", "notes.txt", "missing.png"):
        assert name in err
    assert "Traceback" not in err
    before = _snapshot(idx)
    # an existing index is refused without --overwrite, and a failing rebuild leaves it as it was
    code, _, err = run_cli(capsys, "index", "build", data, "--index", idx, *FAST)
    assert code == 2 and _snapshot(idx) == before
    assert_one_line_error(err, "already exists")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "index", "build", tmp_path / "empty", "--index", idx, "--overwrite", *FAST)
    assert code == 2 and _snapshot(idx) == before
    assert_one_line_error(err, "empty folder")
    pd.DataFrame({"file": ["x.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = run_cli(capsys, "index", "build", tmp_path / "bad.csv", "--index", idx, "--overwrite", *FAST)
    assert code == 2 and _snapshot(idx) == before
    assert_one_line_error(err, "bad.csv", "'path'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "data", "empty", "idx"]


@pytest.mark.slow
def test_index_add(tmp_path, capsys, demo_data):
    idx = tmp_path / "idx"
    assert run_cli(capsys, "index", "build", demo_data / "normal", "--index", idx, *FAST)[0] == 0
    code, out, err = run_cli(capsys, "index", "add", demo_data, "--index", idx, "--quiet")
    assert code == 0, err
    assert "added 18 images (6 already indexed); index now holds 24" in out
    code, out, _ = run_cli(capsys, "index", "info", "--index", idx, "--json")
    assert json.loads(out)["count"] == 24
    code, out, _ = run_cli(
        capsys, "query", demo_data / "severe" / "SYN300_f0.png", "--index", idx, "--k", "1", "--json", "--include-self"
    )
    assert json.loads(out)["results"][0]["score"] == pytest.approx(1, abs=1e-4)  # the added image is found


@pytest.mark.slow
def test_eval_with_report(tmp_path, capsys, demo_index):
    out_json, report = tmp_path / "eval.json", tmp_path / "report"
    code, out, err = run_cli(capsys, "eval", "--index", demo_index, "--json", out_json, "--report", report, "--quiet")
    assert code == 0, err
    res = json.loads(out_json.read_text())
    o = res["overall"]
    assert o["n_queries"] == 24 and 0 < o["map"] <= 1 and 0 < o["mrr"] <= 1
    for key in ("p@1", "p@5", "p@10", "map@r", "knn_accuracy", "knn_balanced_accuracy", "knn_macro_f1"):
        assert 0 <= o[key] <= 1
    assert set(res["per_class"]) == {"normal", "mild", "moderate", "severe"}
    assert res["settings"]["exclude_same_patient"] is True
    assert "| all | 24 |" in out
    for name in ("pr_curve.png", "embedding_map.png"):
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert "MAP" in (report / "summary.md").read_text()
    # including the same patient can only make it easier here (frames of one patient look alike)
    code, out, _ = run_cli(
        capsys, "eval", "--index", demo_index, "--json", out_json, "--include-same-patient", "--quiet"
    )
    assert json.loads(out_json.read_text())["overall"]["map"] >= o["map"]


@pytest.mark.slow
def test_random_resnet18_and_config_recipe(tmp_path, capsys, demo_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "encoder:\n  name: resnet18\n  seed: 3\npreprocess:\n  image_size: 48\n  crop_sector: true\n"
        "index:\n  kind: ivf\n"
    )
    idx = tmp_path / "idx"
    code, out, err = run_cli(capsys, "index", "build", demo_data, "--index", idx, "--config", recipe, "--quiet")
    assert code == 0, err
    assert "randomly initialised (seed 3)" in err
    info = json.loads(run_cli(capsys, "index", "info", "--index", idx, "--json")[1])
    assert info["kind"] == "ivf" and info["fingerprint"]["preprocess"]["image_size"] == 48
    assert info["encoder_spec"] == {"name": "resnet18", "weights": None, "seed": 3}
    code, out, err = run_cli(capsys, "query", demo_data / "mild" / "SYN100_f0.png", "--index", idx, "--k", "2")
    assert code == 0, err


def test_usage_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "index", "build", "--index", tmp_path / "i", "--encoder", "nonet")
    assert code == 2
    code, _, err = run_cli(capsys, "eval", "--index", tmp_path / "nothing")
    assert code == 2
    assert_one_line_error(err, "nothing")


@pytest.mark.slow
def test_demo_and_console_script(tmp_path):
    """The installed `retrieve` command runs the whole demo (smaller images to keep CI short)."""
    exe = shutil.which("retrieve") or f"{sys.executable} -m retrieval.cli.main"
    proc = subprocess.run(
        f"{exe} demo --out {tmp_path / 'demo'} --image-size 96 --quiet",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MAP" in proc.stdout and "vote:" in proc.stdout
    for rel in (
        "data/labels.csv",
        "index/manifest.json",
        "report/pr_curve.png",
        "report/embedding_map.png",
        "report/eval.json",
    ):
        assert (tmp_path / "demo" / rel).is_file()
