"""A PACS-style archive end to end: generated DICOM tree indexed without labels, queried, labels joined
from a CSV, evaluated; identity columns; no-label answers that say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    # the library call of `retrieve eval --labels CSV`: the same figures
    from retrieval.evaluation.evaluate import EvalSettings
    from retrieval.evaluation.index_eval import evaluate_index

    ev = evaluate_index(archive_index, EvalSettings(), progress=False, labels=by_acc)
    assert ev.result["overall"] == result["overall"] and ev.rows["label"].notna().sum() == result["n_labelled"]


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


# --- cases: image hits aggregated to studies, series or patients --------------------------------


def _case_index(tmp_path):
    """A hand-made index: cosine to the query e0 is set exactly per image.

    study D: 30 images at 0.95..0.921 (they fill the first 30 image ranks); study A: 0.90, 0.50;
    an image without a study: 0.85; study B: 0.80, 0.79, 0.78; study C: 0.70.
    """
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet

    sims = [0.95 - 0.001 * j for j in range(30)] + [0.90, 0.50, 0.85, 0.80, 0.79, 0.78, 0.70]
    studies = ["D"] * 30 + ["A", "A", None, "B", "B", "B", "C"]
    labels = ["d"] * 30 + ["a", "a", "x", "b", "b", "b", "c"]
    n = len(sims)
    v = np.zeros((n, 8), np.float32)
    v[:, 0] = sims
    v[:, 1] = np.sqrt(1 - np.square(sims))
    rows = pd.DataFrame(
        {
            "id": [f"im{j}" for j in range(n)],
            "path": [f"/nowhere/im{j}" for j in range(n)],
            "label": labels,
            "patient_id": [f"P{s}" if s else "PX" for s in studies],
            "frame_index": pd.array([None] * n, dtype="Int64"),
            "study_uid": studies,
        }
    )
    fp = {"encoder": "toy", "dim": 8, "preprocess": {}}
    build_index_dir(tmp_path / "cases", VectorSet(rows, v, fp, {"name": "toy"}), IndexConfig(kind="flat", gpu=False))
    return open_index_dir(tmp_path / "cases", use_gpu=False), rows, np.array(sims)


def test_group_by_study_fetches_deep_enough_for_k_cases(tmp_path):
    from retrieval.pipeline import query_vectors

    idx, rows, sims = _case_index(tmp_path)
    q = np.eye(8, dtype=np.float32)[:1]
    (res,) = query_vectors(idx, ["q"], q, 3, group_by="study", agg="max")
    assert [c.case for c in res.cases] == ["D", "A", "image:im32"]  # study D fills the first 30 image ranks
    assert [round(h.score, 4) for h in res.hits] == [0.95, 0.90, 0.85]
    assert res.rows["id"].tolist() == ["im0", "im30", "im32"]  # each case's best image
    assert [c.images for c in res.cases][:2] == [30, 2]
    d = res.to_dict()
    assert d["group_by"] == "study" and [r["case"] for r in d["results"]] == ["D", "A", "image:im32"]
    assert res.vote.votes == {"d": 1.0, "a": 1.0, "x": 1.0} and res.vote.label == "d"  # one vote per case


def test_group_by_mean_matches_a_groupby(tmp_path):
    from retrieval.pipeline import query_vectors

    idx, rows, sims = _case_index(tmp_path)
    q = np.eye(8, dtype=np.float32)[:1]
    (res,) = query_vectors(idx, ["q"], q, 5, group_by="study", agg="mean")
    # every image was searched (depth 20 -> 37), so the mean is over each study's images: an independent groupby
    key = rows["study_uid"].fillna("image:" + rows["id"])
    want = pd.Series(sims, index=rows.index).groupby(key).mean().sort_values(ascending=False)
    assert [c.case for c in res.cases] == list(want.index[:5])
    assert np.allclose([c.score for c in res.cases], want.to_numpy()[:5], atol=1e-5)
    (by_patient,) = query_vectors(idx, ["q"], q, 2, group_by="patient")
    assert [c.case for c in by_patient.cases] == ["PD", "PA"]
    with pytest.raises(RetrieveError, match="--group-by"):
        query_vectors(idx, ["q"], q, 2, group_by="visit")
    with pytest.raises(RetrieveError, match="--agg"):
        query_vectors(idx, ["q"], q, 2, group_by="study", agg="median")


def test_unknown_excluded_patient_is_an_error(tmp_path):
    from retrieval.pipeline import query_vectors

    idx, rows, sims = _case_index(tmp_path)
    q = np.eye(8, dtype=np.float32)[:1]
    with pytest.raises(RetrieveError, match="--exclude-patient NOBODY: no image of this patient"):
        query_vectors(idx, ["q"], q, 2, exclude_patients=["NOBODY"])
    (res,) = query_vectors(idx, ["q"], q, 2, exclude_patients=["PD"])
    assert res.rows["id"].tolist() == ["im30", "im32"]


# --- batch queries: a folder of query images -> one table ----------------------------------------


@pytest.mark.slow
def test_batch_query_of_a_folder_in_one_faiss_batch(archive, archive_index, tmp_path, monkeypatch):
    import retrieval.pipeline as pipeline
    from indexer.index_dir import read_manifest
    from retrieval.batch import query_source, results_table, write_results

    root, files = archive
    m = read_manifest(archive_index)
    loaded = pipeline.encoder_for_index(m.fingerprint, m.encoder_spec, "test")
    idx = open_index_dir(archive_index, use_gpu=False)
    calls = []
    real = pipeline.search
    monkeypatch.setattr(pipeline, "search", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    answer = query_source(idx, loaded, root / "PAT003", 3, progress=False, use_gpu=False)
    assert calls == [5]  # 3 stills, the VOI LUT image, the bare file: one search of 5 vectors
    assert [s.path for s in answer.skipped] == [str(files["report"].resolve())]
    # the same answers as querying file by file
    single, _ = pipeline.query_files(idx, loaded, [str(files["voi"])], 3)
    voi = next(r for r in answer.results if r.query.endswith("SERIES2/IM0001"))
    assert voi.rows["id"].tolist() == single[0].rows["id"].tolist()
    assert str(files["voi"].resolve()) not in voi.rows["path"].tolist()  # not its own neighbour
    table = results_table(answer.results, answer.query_labels)
    assert len(table) == 5 * 3 and table.groupby("query")["rank"].apply(list).map(lambda r: r == [1, 2, 3]).all()
    assert {"query", "query_label", "rank", "score", "id", "path", "study_uid", "vote_label", "vote_note"} <= set(
        table.columns
    )
    assert table["vote_note"].str.startswith("no labels").all()
    for suffix in (".csv", ".parquet"):
        out = write_results(table, tmp_path / f"r{suffix}")
        back = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
        assert back["id"].tolist() == table["id"].tolist() and np.allclose(back["score"], table["score"])
    with pytest.raises(RetrieveError, match="--out"):
        write_results(table, tmp_path / "r.xlsx")
    grouped = query_source(idx, loaded, root / "PAT003", 2, group_by="series", progress=False, use_gpu=False)
    gt = results_table(grouped.results)
    assert len(gt) == 10 and gt["case"].notna().all() and (gt.groupby("query")["case"].nunique() == 2).all()


def test_bad_archive_inputs_are_one_line_errors(archive, archive_index, capsys):
    root, files = archive
    code, out, err = run_cli(capsys, "query", files["report"], "--index", archive_index, "--k", "2")
    assert code == 2
    assert_one_line_error(err, "without pixel data")
    q = files["PAT001/STUDY1/SERIES1/IM0001"]
    code, out, err = run_cli(capsys, "query", q, "--index", archive_index, "--exclude-patient", "PAT404")
    assert code == 2
    assert_one_line_error(err, "--exclude-patient PAT404")


# --- the command line: --labels, --group-by, a folder with --out, eval --labels --------------------


@pytest.mark.slow
def test_cli_archive_labels_cases_batch_and_eval(archive, archive_index, tmp_path, capsys):
    root, files = archive
    truth, by_acc = _label_csvs(root, files, tmp_path)
    code, out, err = run_cli(capsys, "eval", "--index", archive_index, "--labels", by_acc, "--quiet", "--k", "3")
    assert code == 0, err
    assert "MAP" in out or "map" in out.lower()
    labelled = tmp_path / "labelled"
    code, out, err = run_cli(capsys, "index", "build", root, "--index", labelled, "--labels", by_acc, *ENC)
    assert code == 0, err
    assert "ACC-UNKNOWN" in err  # the CSV key that matches no image is reported
    q = files["PAT002/STUDY1/SERIES1/IM0001"]
    code, out, err = run_cli(capsys, "query", q, "--index", labelled, "--k", "2", "--group-by", "study", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["group_by"] == "study" and len({r["case"] for r in res["results"]}) == 2
    assert res["vote"]["label"] in {"benign", "malignant"}
    code, out, err = run_cli(capsys, "query", q, "--index", labelled, "--k", "2", "--group-by", "series")
    assert code == 0 and "cases by series" in out and "vote:" in out
    csv = tmp_path / "results.csv"
    code, out, err = run_cli(capsys, "query", root / "PAT001", "--index", labelled, "--k", "2", "--out", csv, "--quiet")
    assert code == 0, err
    table = pd.read_csv(csv)
    assert len(table) == 2 * 12 and set(table["rank"]) == {1, 2}  # 9 stills and a 3-frame clip: 12 queries
    assert table["vote_label"].isin(["benign", "malignant"]).all()
    code, out, err = run_cli(capsys, "query", q, "--index", labelled, "--group-by", "visit")
    assert code == 2
    assert_one_line_error(err, "--group-by visit")
