"""Every command on every real dataset in ../shared/data (skipped, with the reason, when it is absent)."""

import json

import pandas as pd
import pytest
from conftest import FAST, SHARED_DATA, run_cli

DATASETS = sorted(p.name for p in SHARED_DATA.glob("*") if (p / "labels.csv").is_file()) if SHARED_DATA.is_dir() else []
pytestmark = pytest.mark.skipif(
    not DATASETS, reason=f"real datasets not found at {SHARED_DATA} (CI provides ../shared/data)"
)


@pytest.fixture(scope="module", params=DATASETS or ["none"])
def built(request, tmp_path_factory):
    """`retrieve embed` then `retrieve index build --vectors` on the whole dataset."""
    from retrieval.cli.main import main

    data = SHARED_DATA / request.param
    work = tmp_path_factory.mktemp(request.param)
    vectors, index = work / "vectors.parquet", work / "index"
    assert main(["embed", str(data), "--out", str(vectors), *FAST]) == 0
    assert main(["index", "build", "--vectors", str(vectors), "--index", str(index)]) == 0
    return data, index


@pytest.mark.slow
def test_index_add_reaches_the_same_index(built, capsys, tmp_path):
    """Half the dataset indexed, then the whole dataset added: same rows, same vectors."""
    from indexer.index_dir import open_index_dir

    data, full = built
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    half = labels.iloc[::2].copy()
    half["path"] = [str((data / p).resolve()) for p in half["path"]]
    half.to_csv(tmp_path / "half.csv", index=False)
    index = tmp_path / "index"
    assert run_cli(capsys, "index", "build", tmp_path / "half.csv", "--index", index, *FAST)[0] == 0
    code, out, err = run_cli(capsys, "index", "add", data, "--index", index, "--quiet")
    assert code == 0, err
    assert f"added {len(labels) - len(half)} images ({len(half)} already indexed)" in out
    a, b = open_index_dir(index, use_gpu=False), open_index_dir(full, use_gpu=False)
    order = a.rows["path"].argsort().to_numpy()
    ref = b.rows["path"].argsort().to_numpy()
    assert a.rows["path"].to_numpy()[order].tolist() == b.rows["path"].to_numpy()[ref].tolist()
    assert abs(a.vectors.vectors[order] - b.vectors.vectors[ref]).max() < 1e-4


@pytest.mark.slow
def test_index_holds_every_image(built, capsys):
    data, index = built
    info = json.loads(run_cli(capsys, "index", "info", "--index", index, "--json")[1])
    labels = pd.read_csv(data / "labels.csv")
    assert info["count"] == len(labels)
    assert info["labels"] == {str(k): int(v) for k, v in labels["label"].value_counts().sort_index().items()}


@pytest.mark.slow
def test_query_excludes_the_patient_or_group(built, capsys):
    data, index = built
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    with_pid = labels[labels["patient_id"].notna()]
    row = (with_pid if len(with_pid) else labels).iloc[0]
    args = ["query", data / row["path"], "--index", index, "--k", "5", "--json"]
    if isinstance(row["patient_id"], str):
        args += ["--exclude-patient", row["patient_id"]]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    res = json.loads(out)
    assert len(res["results"]) == 5 and res["vote"]["label"] in set(labels["label"])
    if isinstance(row["patient_id"], str):
        assert all(r["patient_id"] != row["patient_id"] for r in res["results"])
    else:  # no patient ids: the query image itself is in the index, left out unless --include-self
        own = str((data / row["path"]).resolve())
        assert own not in [r["path"] for r in res["results"]]
        code, out, err = run_cli(capsys, *args, "--include-self")
        assert code == 0, err
        first = json.loads(out)["results"][0]
        assert first["path"] == own and first["score"] == pytest.approx(1, abs=1e-4)


@pytest.mark.slow
def test_eval_respects_grouping(built, capsys, tmp_path):
    data, index = built
    out = tmp_path / "eval.json"
    code, _, err = run_cli(capsys, "eval", "--index", index, "--json", out, "--quiet")
    assert code == 0, err
    res = json.loads(out.read_text())
    o = res["overall"]
    assert 0 < o["map"] <= 1 and 0 < o["mrr"] <= 1 and 0 <= o["knn_accuracy"] <= 1
    assert o["n_queries"] + res["queries_without_relevant"] + res["queries_with_empty_gallery"] == res["n_labelled"]
    # grouping by patient / near-duplicate group removes the easy matches, so P@1 cannot rise
    code, _, _ = run_cli(
        capsys, "eval", "--index", index, "--json", out, "--include-same-patient", "--include-near-dup", "--quiet"
    )
    assert json.loads(out.read_text())["overall"]["p@1"] >= o["p@1"]
