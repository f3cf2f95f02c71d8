"""Leave-one-out evaluation against an independent per-query computation with scikit-learn."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from retrieval.errors import RetrieveError
from retrieval.evaluation.evaluate import EvalSettings, evaluate


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_map(rows, vectors, same_patient=True, near_dup=True):
    """Straightforward loops: gallery = labelled others minus same patient / near-dup group."""
    aps, rrs = [], []
    for q in range(len(rows)):
        keep = []
        for g in range(len(rows)):
            if g == q:
                continue
            if same_patient and rows.patient_id[q] and rows.patient_id[g] == rows.patient_id[q]:
                continue
            if near_dup and rows.near_dup_group[q] and rows.near_dup_group[g] == rows.near_dup_group[q]:
                continue
            keep.append(g)
        y = np.array([rows.label[g] == rows.label[q] for g in keep])
        if not y.any():
            continue
        s = np.array([vectors[q] @ vectors[g] for g in keep])
        aps.append(average_precision_score(y, s))
        order = np.argsort(-s)
        rrs.append(1.0 / (np.flatnonzero(y[order])[0] + 1))
    return float(np.mean(aps)), float(np.mean(rrs)), len(aps)


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    n = 40
    labels = rng.choice(["a", "b", "c"], n)
    centres = {"a": rng.normal(size=8), "b": rng.normal(size=8), "c": rng.normal(size=8)}
    vectors = _unit(np.stack([centres[lab] + rng.normal(scale=1.2, size=8) for lab in labels]).astype(np.float32))
    rows = pd.DataFrame(
        {
            "id": [f"i{j}" for j in range(n)],
            "label": labels,
            "patient_id": [f"p{j // 4}" for j in range(n)],
            "near_dup_group": [("g1" if j in (1, 17) else "") for j in range(n)],
        }
    )
    return rows, vectors


@pytest.mark.parametrize("same_patient,near_dup", [(True, True), (False, False), (True, False)])
def test_map_mrr_match_reference(toy, same_patient, near_dup):
    rows, vectors = toy
    res = evaluate(
        rows, vectors, EvalSettings(exclude_same_patient=same_patient, exclude_near_dup=near_dup), progress=False
    )
    ref_map, ref_mrr, n = _reference_map(rows, vectors, same_patient, near_dup)
    assert res["overall"]["n_queries"] == n
    assert res["overall"]["map"] == pytest.approx(ref_map, abs=1e-6)
    assert res["overall"]["mrr"] == pytest.approx(ref_mrr, abs=1e-6)


def test_patient_exclusion_matters_and_self_never_counts():
    # each patient has two identical images: without exclusion every query finds its twin first
    v = _unit(np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32))
    vectors = np.repeat(v, 2, axis=0)
    rows = pd.DataFrame(
        {"id": list(range(12)), "label": ["x", "y"] * 6, "patient_id": [f"p{j // 2}" for j in range(12)]}
    )
    rows["label"] = [("x" if j // 2 < 3 else "y") for j in range(12)]
    with_twins = evaluate(rows, vectors, EvalSettings(exclude_same_patient=False), progress=False)
    assert with_twins["overall"]["p@1"] == 1.0  # twin (same patient, same label) found first
    without = evaluate(rows, vectors, EvalSettings(exclude_same_patient=True), progress=False)
    assert without["overall"]["p@1"] < 1.0
    # self is excluded: with a single image per label there is nothing relevant to find
    rows2 = pd.DataFrame({"id": [0, 1], "label": ["x", "y"], "patient_id": ["a", "b"]})
    with pytest.raises(RetrieveError):
        evaluate(rows2, vectors[:2], progress=False)


def test_vote_metrics_and_counts(toy):
    rows, vectors = toy
    res = evaluate(rows, vectors, EvalSettings(k=5), progress=False)
    o = res["overall"]
    assert 0 <= o["knn_accuracy"] <= 1 and 0 <= o["knn_macro_f1"] <= 1
    assert set(res["per_class"]) == {"a", "b", "c"}
    assert sum(c["n_queries"] for c in res["per_class"].values()) == o["n_queries"]
    assert len(res["pr_curve"]["precision"]) == 101


def test_query_without_relevant_is_left_out_and_counted():
    vectors = _unit(np.eye(4, dtype=np.float32) + 0.1)
    rows = pd.DataFrame({"id": range(4), "label": ["a", "a", "b", "c"], "patient_id": ["1", "2", "3", "4"]})
    res = evaluate(rows, vectors, progress=False)
    assert res["overall"]["n_queries"] == 2
    assert res["queries_without_relevant"] == 2


def test_needs_labels():
    rows = pd.DataFrame({"id": [0, 1, 2], "label": [None, None, None], "patient_id": [None] * 3})
    with pytest.raises(RetrieveError, match="labels"):
        evaluate(rows, np.eye(3, dtype=np.float32), progress=False)


def test_query_and_gallery_masks(toy):
    """Held-out queries against a training gallery equal the loop computed on that split alone."""
    rows, vectors = toy
    test = np.arange(len(rows)) % 4 == 0
    res = evaluate(
        rows,
        vectors,
        EvalSettings(exclude_same_patient=False, exclude_near_dup=False),
        progress=False,
        query_mask=test,
        gallery_mask=~test,
    )
    aps = []
    for q in np.flatnonzero(test):
        g = np.flatnonzero(~test)
        y = rows.label.to_numpy()[g] == rows.label[q]
        if y.any():
            aps.append(average_precision_score(y, vectors[g] @ vectors[q]))
    assert res["overall"]["n_queries"] == len(aps)
    assert res["overall"]["map"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_per_query_rows_match_sklearn(toy):
    """keep_per_query gives each scored query's row and AP; each AP equals sklearn's on that split."""
    rows, vectors = toy
    test = np.arange(len(rows)) % 4 == 0
    res = evaluate(
        rows,
        vectors,
        EvalSettings(exclude_same_patient=False, exclude_near_dup=False),
        progress=False,
        query_mask=test,
        gallery_mask=~test,
        keep_per_query=True,
    )
    g = np.flatnonzero(~test)
    assert [q["row"] for q in res["per_query"]] == [
        q for q in np.flatnonzero(test) if (rows.label[g] == rows.label[q]).any()
    ]
    for q in res["per_query"]:
        assert q["label"] == rows.label[q["row"]]
        y = rows.label.to_numpy()[g] == rows.label[q["row"]]
        assert q["ap"] == pytest.approx(average_precision_score(y, vectors[g] @ vectors[q["row"]]), abs=1e-6)
    assert "per_query" not in evaluate(rows, vectors, progress=False)


def _reference_votes(rows, vectors, k, same_patient=True, near_dup=True):
    """(true label, voted label) per query by plain loops: the gallery as in _reference_map, the k nearest vote."""
    from retrieval.vote import knn_vote

    y_true, y_pred = [], []
    for q in range(len(rows)):
        keep = [
            g
            for g in range(len(rows))
            if g != q
            and not (same_patient and rows.patient_id[g] == rows.patient_id[q])
            and not (near_dup and rows.near_dup_group[q] and rows.near_dup_group[g] == rows.near_dup_group[q])
        ]
        s = np.array([float(vectors[q] @ vectors[g]) for g in keep])
        top = [keep[j] for j in np.argsort(-s, kind="stable")[:k]]
        y_true.append(rows.label[q])
        y_pred.append(knn_vote([rows.label[g] for g in top], [float(vectors[q] @ vectors[g]) for g in top]).label)
    return y_true, y_pred


def test_vote_confusion_matches_sklearn(toy):
    from sklearn.metrics import confusion_matrix

    from retrieval.evaluation.report import confusion_tables

    rows, vectors = toy
    res = evaluate(rows, vectors, EvalSettings(k=5), progress=False)
    y_true, y_pred = _reference_votes(rows, vectors, 5)
    conf = res["vote_confusion"]
    assert conf["labels"] == conf["columns"] == ["a", "b", "c"]
    expected = confusion_matrix(y_true, y_pred, labels=["a", "b", "c"])
    assert np.array_equal(np.array(conf["counts"]), expected)
    assert np.trace(expected) / expected.sum() == pytest.approx(res["overall"]["knn_accuracy"])
    counts, shares = confusion_tables(res)
    assert np.array_equal(counts.to_numpy(), expected)
    assert np.allclose(shares.to_numpy(), confusion_matrix(y_true, y_pred, labels=["a", "b", "c"], normalize="true"))


def test_vote_confusion_counts_queries_without_a_vote():
    from retrieval.evaluation.evaluate import vote_confusion

    conf = vote_confusion(["b", "a", "a", "b"], ["b", None, "b", "b"])
    assert conf["labels"] == ["a", "b"] and conf["columns"] == ["a", "b", "(no vote)"]
    assert conf["counts"] == [[0, 1, 1], [0, 2, 0]]


def test_chance_precision_is_the_mean_share_of_relevant_images(toy):
    rows, vectors = toy
    res = evaluate(rows, vectors, EvalSettings(exclude_same_patient=True, exclude_near_dup=True), progress=False)
    shares = []
    for q in range(len(rows)):
        gallery = [
            g
            for g in range(len(rows))
            if g != q
            and rows.patient_id[g] != rows.patient_id[q]
            and not (rows.near_dup_group[q] and rows.near_dup_group[g] == rows.near_dup_group[q])
        ]
        relevant = [rows.label[g] == rows.label[q] for g in gallery]
        if any(relevant):
            shares.append(np.mean(relevant))
    assert res["pr_curve"]["chance_precision"] == pytest.approx(np.mean(shares), abs=1e-5)
    # a useful encoder beats chance at low recall; the toy's clusters are separable enough for that
    assert res["pr_curve"]["precision"][1] > res["pr_curve"]["chance_precision"]


@pytest.mark.slow
def test_report_writes_confusion_matrix_and_chance_line(toy, tmp_path):
    from PIL import Image

    from retrieval.evaluation.report import write_report

    rows, vectors = toy
    res = evaluate(rows, vectors, EvalSettings(k=5), progress=False)
    paths = write_report(res, rows, vectors, tmp_path / "report", "toy", "test-encoder")
    assert paths["confusion"] == tmp_path / "report" / "confusion.png"
    with Image.open(paths["confusion"]) as im:
        assert im.format == "PNG" and min(im.size) > 200
    summary = paths["summary"].read_text()
    assert "![kNN vote confusion matrix](confusion.png)" in summary
    counts = np.array(res["vote_confusion"]["counts"])
    first = f"| a | {counts[0, 0]} ({counts[0, 0] / counts[0].sum():.0%}) |"
    assert first in summary


@pytest.mark.slow
def test_pr_plot_draws_the_chance_line(toy, tmp_path, monkeypatch):
    from retrieval.evaluation import report

    rows, vectors = toy
    res = evaluate(rows, vectors, progress=False)
    drawn = {}
    plt = report._plt()
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        for line in fig.axes[0].get_lines():
            drawn[line.get_label()] = line.get_ydata()
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", capture)
    report.plot_pr_curve(res, tmp_path / "pr.png")
    chance = [label for label in drawn if label.startswith("chance")]
    assert len(chance) == 1 and "share of" in chance[0] and "relevant images" in chance[0]
    assert np.allclose(drawn[chance[0]], res["pr_curve"]["chance_precision"])


@pytest.mark.slow
def test_eval_cli_report_has_the_vote_confusion(tmp_path, capsys, demo_index):
    """`retrieve eval --report` writes confusion.png and the table; the counts add up to the vote's accuracy."""
    from conftest import run_cli
    from PIL import Image

    out_json, report = tmp_path / "eval.json", tmp_path / "report"
    code, out, err = run_cli(capsys, "eval", "--index", demo_index, "--json", out_json, "--report", report, "--quiet")
    assert code == 0, err
    res = __import__("json").loads(out_json.read_text())
    conf = res["vote_confusion"]
    counts = np.array(conf["counts"])
    assert conf["labels"] == ["mild", "moderate", "normal", "severe"]
    assert counts.sum() == res["overall"]["n_vote_queries"] == 24
    assert np.trace(counts) / counts.sum() == pytest.approx(res["overall"]["knn_accuracy"])
    assert counts.sum(axis=1).tolist() == [6, 6, 6, 6]  # every labelled image queries once
    # 4 grades x 2 patients x 3 frames, own patient left out: 3 relevant images in a gallery of 21
    assert res["pr_curve"]["chance_precision"] == pytest.approx(3 / 21, abs=1e-5)
    with Image.open(report / "confusion.png") as im:
        assert im.format == "PNG"
    assert "kNN vote confusion" in out and "confusion.png" in err + out
