"""A PACS-style archive end to end: generated DICOM tree indexed without labels, queried, labels joined
from a CSV, evaluated; identity columns; no-label answers that say so."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_one_line_error, run_cli
from dicom_factory import make_pacs_tree

from indexer.index_dir import open_index_dir
from retrieval.errors import RetrieveError
from retrieval.evaluation.evaluate import evaluate
from retrieval.labels import join_labels, read_label_csv

ENC = ["--encoder", "intensity-stats", "--image-size", "48", "--quiet"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(data root, files) of a generated PACS tree: 3 patients, 4 studies, 9 series, suffix-less files."""
    root = tmp_path_factory.mktemp("archive") / "pacs"
    return root, make_pacs_tree(root)


@pytest.fixture(scope="module")
def archive_index(archive, tmp_path_factory):
    from retrieval.cli.main import main

    index = tmp_path_factory.mktemp("archive_idx") / "idx"
    assert main(["index", "build", str(archive[0]), "--index", str(index), *ENC]) == 0
    return index


def test_archive_indexed_without_labels(archive_index):
    idx = open_index_dir(archive_index, use_gpu=False)
    rows = idx.rows
    assert idx.count == 24 and idx.manifest.labels == {"(unlabelled)": 24}
    assert rows["label"].isna().all()
    assert {
        "patient_id",
        "study_uid",
        "series_uid",
        "sop_uid",
        "modality",
        "body_part",
        "study_date",
        "accession",
    } <= set(rows.columns)
    assert set(rows["patient_id"]) == {"PAT001", "PAT002", "PAT003"}
    assert not any("Doe" in str(v) for v in rows.astype(str).to_numpy().ravel())  # PatientName never stored


def test_query_without_labels_says_so(archive, archive_index, capsys):
    q = archive[1]["PAT001/STUDY1/SERIES1/IM0001"]
    code, out, err = run_cli(capsys, "query", q, "--index", archive_index, "--k", "3", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["vote"]["label"] is None and res["vote"]["note"].startswith("no labels")
    assert len(res["results"]) == 3 and str(q.resolve()) not in [r["path"] for r in res["results"]]
    assert all(r["study_uid"] and r["series_uid"] for r in res["results"])


def test_eval_without_labels_is_a_one_line_error(archive_index, capsys):
    code, out, err = run_cli(capsys, "eval", "--index", archive_index, "--quiet")
    assert code == 2
    assert_one_line_error(err, "no labels")


def _label_csvs(root, files, tmp_path):
    """The same truth (label = the image's pattern family by patient) as three CSVs: by path, sop_uid, accession."""
    truth = {"ACC1": "benign", "ACC2": "benign", "ACC3": "malignant", "ACC4": "malignant"}
    by_acc = tmp_path / "by_accession.csv"
    pd.DataFrame({"accession": [*truth, "ACC-UNKNOWN"], "label": [*truth.values(), "benign"]}).to_csv(
        by_acc, index=False
    )
    return truth, by_acc


def test_labels_joined_by_accession_path_and_sop_uid(archive, archive_index, tmp_path):
    root, files = archive
    idx = open_index_dir(archive_index, use_gpu=False)
    rows = idx.rows
    truth, by_acc = _label_csvs(root, files, tmp_path)
    joined, report = join_labels(rows, by_acc, root)
    assert report.key == "accession" and report.unknown_keys == ["ACC-UNKNOWN"]
    has_acc = rows["accession"].notna()
    assert (joined.loc[has_acc, "label"] == rows.loc[has_acc, "accession"].map(truth)).all()
    assert joined.loc[~has_acc, "label"].isna().all() and report.unlabelled == int((~has_acc).sum())
    # by path (relative to the data root) and by sop_uid give the same labels for the images they name
    some = rows[has_acc].head(5)
    by_path = tmp_path / "by_path.csv"
    rel = [str(Path(p).relative_to(root.resolve())) for p in some["path"]]
    pd.DataFrame({"path": rel + ["nowhere/IM9"], "label": list(some["accession"].map(truth)) + ["x"]}).to_csv(
        by_path, index=False
    )
    j2, r2 = join_labels(rows, by_path, root)
    assert r2.key == "path" and r2.labelled == 5 and len(r2.unknown_keys) == 1
    assert (j2.loc[some.index, "label"] == some["accession"].map(truth)).all()
    by_sop = tmp_path / "by_sop.csv"
    pd.DataFrame({"sop_uid": some["sop_uid"], "label": some["accession"].map(truth)}).to_csv(by_sop, index=False)
    j3, r3 = join_labels(rows, by_sop, root)
    assert r3.key == "sop_uid" and r3.labelled == 5 and r3.unknown_keys == []


def test_label_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"file": ["a"], "label": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(RetrieveError, match="needs a key column"):
        read_label_csv(bad)
    pd.DataFrame({"path": ["a", "a"], "label": ["x", "y"]}).to_csv(bad, index=False)
    with pytest.raises(RetrieveError, match="two different labels"):
        read_label_csv(bad)
    with pytest.raises(RetrieveError, match="no such file"):
        read_label_csv(tmp_path / "missing.csv")


def test_evaluate_with_joined_labels(archive, archive_index, tmp_path):
    root, files = archive
    vs = open_index_dir(archive_index, use_gpu=False).vectors
    truth, by_acc = _label_csvs(root, files, tmp_path)
    joined, _ = join_labels(vs.rows, by_acc, root)
    result = evaluate(joined, vs.vectors, progress=False)
    assert result["n_labelled"] == int(vs.rows["accession"].notna().sum())
    assert set(result["classes"]) == {"benign", "malignant"}
    assert 0.0 <= result["overall"]["map"] <= 1.0


def test_index_build_joins_labels(archive, tmp_path):
    from indexer.config import IndexConfig
    from retrieval.config import EncoderSpec
    from retrieval.pipeline import build_index_streaming, load_encoder

    root, files = archive
    truth, by_acc = _label_csvs(root, files, tmp_path)
    loaded = load_encoder(EncoderSpec("intensity-stats"), {"image_size": 48})
    manifest, skipped, _ = build_index_streaming(
        root, loaded, tmp_path / "idx", IndexConfig(kind="flat", gpu=False), progress=False, labels=by_acc
    )
    # ACC1: 2 series of 3 + a 3-frame clip; ACC2: 3; ACC3: 2 series of 3 + MONOCHROME1; ACC4: 3 + VOI LUT
    assert manifest.labels == {"(unlabelled)": 1, "benign": 12, "malignant": 11}  # the bare file has no accession
    assert [s.path for s in skipped] == [str(files["report"].resolve())]
