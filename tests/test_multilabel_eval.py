"""Multi-label labels (`liver|kidney`) in evaluation and at query time: relevance = the two class sets share a
class; the vote suggests the classes named by at least half of the vote. Hand-worked cases, and an
independent computation (scikit-learn's average_precision_score per query, f1_score on a MultiLabelBinarizer,
plain Python sets for relevance and the vote) on generated data."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from retrieval.errors import RetrieveError
from retrieval.evaluation.evaluate import EvalSettings, evaluate
from retrieval.labels import is_multilabel, label_matrix, label_set, read_label_csv
from retrieval.vote import knn_vote, multilabel_vote

ML = EvalSettings(k=2, exclude_same_patient=False, exclude_near_dup=False, multilabel="auto")


def _angles(degrees):
    t = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


def _rows(labels, patients=None):
    n = len(labels)
    return pd.DataFrame(
        {
            "id": [f"i{j}" for j in range(n)],
            "label": labels,
            "patient_id": patients if patients is not None else [""] * n,
            "near_dup_group": [""] * n,
        }
    )


# --- labels ---------------------------------------------------------------------------------------------


def test_label_sets_are_split_stripped_and_unordered():
    assert label_set("liver|kidney") == label_set(" kidney | liver ") == label_set("kidney|liver|kidney")
    assert label_set("liver") == frozenset({"liver"})
    classes, m = label_matrix(["b|a", "c", "a"])
    assert classes == ["a", "b", "c"]
    assert m.tolist() == [[True, True, False], [False, False, True], [True, False, False]]
    assert is_multilabel(["a", None, "a|b"]) and not is_multilabel(["a", None, "b"])


@pytest.mark.parametrize("bad", ["liver|", "|kidney", "|", "a||b", "a| |b"])
def test_empty_class_name_is_refused(bad):
    with pytest.raises(RetrieveError, match="empty class name") as e:
        label_set(bad, " (image id 7)")
    assert "image id 7" in str(e.value) and "\n" not in str(e.value)


def test_label_csv_with_an_empty_class_part_is_refused(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.png,liver|kidney\nb.png,liver|\n")
    with pytest.raises(RetrieveError, match=r"'liver\|'.*b\.png"):
        read_label_csv(csv)
    csv.write_text("path,label\na.png,liver|kidney\nb.png,liver\n")
    assert read_label_csv(csv)[1]["label"].tolist() == ["liver|kidney", "liver"]


# --- vote -----------------------------------------------------------------------------------------------


def test_multilabel_vote_worked_by_hand():
    # majority, 4 neighbours: a in 3 of them (0.75), b in 2 (0.5), c in 1 (0.25) -> {a, b}
    v = multilabel_vote([{"a", "b"}, {"a"}, {"b", "c"}, {"a"}], [0.9, 0.8, 0.7, 0.6])
    assert v.labels == ["a", "b"] and v.label == "a|b"
    assert v.votes == pytest.approx({"a": 0.75, "b": 0.5, "c": 0.25})
    assert list(v.votes) == ["a", "b", "c"] and v.confidence == pytest.approx(0.5)
    # an unlabelled neighbour does not vote; similarity weights (1 + cos) / 2: 1.0, 0.5 (cos 0), 0.0 (cos -1)
    v = multilabel_vote([{"a"}, None, {"b"}, {"b", "c"}], [1.0, 0.9, 0.0, -1.0], "similarity")
    assert v.votes == pytest.approx({"a": 1.0 / 1.5, "b": 0.5 / 1.5, "c": 0.0})
    assert v.labels == ["a"]
    # no class reaches half: an empty set, and the vote says why
    v = multilabel_vote([{"a"}, {"b"}, {"c"}], [0.3, 0.2, 0.1])
    assert v.label is None and v.labels == [] and "at least 0.5" in (v.note or "")
    assert multilabel_vote([None, None], [0.5, 0.4]).note == "no labelled neighbours"


def test_knn_vote_multilabel_parses_labels_and_single_label_dict_is_unchanged():
    v = knn_vote(["liver|kidney", "kidney", None, ""], [0.9, 0.8, 0.7, 0.6], multilabel=True)
    assert v.labels == ["kidney", "liver"] and v.to_dict()["labels"] == ["kidney", "liver"]
    assert v.to_dict()["votes"] == {"kidney": 1.0, "liver": 0.5} and "rule" in v.to_dict()
    single = knn_vote(["a", "b", "a"], [0.9, 0.8, 0.1]).to_dict()
    assert set(single) == {"label", "confidence", "votes"}
    with pytest.raises(RetrieveError, match="empty class name"):
        knn_vote(["liver|", "kidney"], [0.9, 0.8], multilabel=True)


# --- evaluation worked by hand ----------------------------------------------------------------------------


def test_overlap_relevance_metrics_and_vote_worked_by_hand():
    """Five unit vectors at 0, 20, 50, 110, 150 degrees labelled a|b, a, b, c, b|c (worked in the test's
    comments; each query ranks the other four by cosine)."""
    rows = _rows(["a|b", "a", "b", "c", "b|c"])
    res = evaluate(rows, _angles([0, 20, 50, 110, 150]), ML, progress=False, keep_per_query=True)
    # query 0 (a|b): ranks 1 a, 2 b, 3 c, 4 b|c -> relevant 1,1,0,1: AP (1 + 1 + 3/4) / 3, MAP@R 2/3
    # query 1 (a):   ranks 0 a|b, 2, 3, 4       -> relevant 1,0,0,0: AP 1
    # query 2 (b):   ranks 1 a, 0 a|b, 3 c, 4   -> relevant 0,1,0,1: AP (1/2 + 2/4) / 2, RR 1/2, MAP@R 1/4
    # query 3 (c):   ranks 4 b|c, 2, 1, 0       -> relevant 1,0,0,0: AP 1
    # query 4 (b|c): ranks 3 c, 2 b, 1 a, 0 a|b -> relevant 1,1,0,1: AP 11/12, MAP@R 2/3
    ap = {q["row"]: q["ap"] for q in res["per_query"]}
    assert ap == pytest.approx({0: 11 / 12, 1: 1.0, 2: 0.5, 3: 1.0, 4: 11 / 12})
    o = res["overall"]
    assert o["map"] == pytest.approx((11 / 12 * 2 + 2.5) / 5)
    assert o["mrr"] == pytest.approx(0.9) and o["p@1"] == pytest.approx(0.8)
    assert o["map@r"] == pytest.approx((2 / 3 + 1 + 0.25 + 1 + 2 / 3) / 5)
    assert o["p@5"] == pytest.approx((3 / 4 + 1 / 4 + 2 / 4 + 1 / 4 + 3 / 4) / 5)  # P@5 over a gallery of 4
    # k = 2 vote: q0 {a, b} (right), q1 {a, b}, q2 {a, b}, q3 {b, c}, q4 {b, c} (right)
    # a: TP 2 FP 1 FN 0 -> F1 0.8; b: TP 3 FP 2 -> F1 0.75; c: TP 2 -> F1 1; micro TP 7 FP 3 FN 0 -> 14/17
    assert res["classes"] == ["a", "b", "c"]
    assert [res["per_class"][c]["knn_f1"] for c in "abc"] == pytest.approx([0.8, 0.75, 1.0])
    assert res["per_class"]["a"]["knn_precision"] == pytest.approx(2 / 3)
    assert o["knn_micro_f1"] == pytest.approx(14 / 17) and o["knn_macro_f1"] == pytest.approx(0.85)
    assert o["knn_exact_match"] == pytest.approx(0.4)
    assert "knn_balanced_accuracy" not in o and "vote_confusion" not in res
    # per class: the queries whose set names it (a: queries 0 and 1)
    assert res["per_class"]["a"]["map"] == pytest.approx((11 / 12 + 1) / 2)
    assert res["per_class"]["a"]["n_queries"] == 2 and res["per_class"]["b"]["n_queries"] == 3
    assert res["multilabel"]["label_sets"] == {"a": 1, "a|b": 1, "b": 1, "b|c": 1, "c": 1}
    assert res["exact_set"]["n_queries"] == 0 and res["exact_set"]["queries_without_exact_match"] == 5


def test_exact_set_relevance_worked_by_hand():
    """0 a|b at 0 deg, 1 a at 10, 2 a|b at 40, 3 b at 75. Exact set: only queries 0 and 2 have one."""
    rows = _rows(["a|b", "a", "a|b", "b"])
    res = evaluate(rows, _angles([0, 10, 40, 75]), ML, progress=False)
    # overlap: q0 ranks 1,2,3 all relevant (AP 1); q1 ranks 0,2,3 -> 1,1,0 (AP 1); q2 ranks 1,3,0 all relevant;
    # q3 (b) ranks 2 (cos 35), 1 (cos 65), 0 (cos 75) -> 1,0,1: AP (1 + 2/3) / 2
    assert res["overall"]["map"] == pytest.approx((3 + 5 / 6) / 4)
    # exact: q0 ranks 1 a, 2 a|b, 3 b -> 0,1,0: AP 1/2; q2 ranks 1, 3, 0 a|b -> 0,0,1: AP 1/3
    e = res["exact_set"]
    assert e["n_queries"] == 2 and e["queries_without_exact_match"] == 2
    assert e["map"] == pytest.approx((1 / 2 + 1 / 3) / 2) and e["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert e["p@1"] == 0.0


def test_the_readme_example():
    """README: a query liver|kidney whose ranked gallery is liver, spleen, kidney|spleen: relevance 1, 0, 1,
    AP (1 + 2/3) / 2; no image with its exact set."""
    rows = _rows(["liver|kidney", "liver", "spleen", "kidney|spleen"])
    res = evaluate(rows, _angles([0, 10, 30, 60]), ML, progress=False, keep_per_query=True)
    q0 = next(q for q in res["per_query"] if q["row"] == 0)
    assert q0["ap"] == pytest.approx(5 / 6) and q0["label"] == "kidney|liver"
    assert res["exact_set"]["n_queries"] == 0


def test_modes_off_and_on():
    rows = _rows(["a|b", "a", "a|b", "b"])
    vectors = _angles([0, 10, 40, 75])
    off = evaluate(rows, vectors, EvalSettings(k=2, exclude_same_patient=False, multilabel="off"), progress=False)
    assert "multilabel" not in off and sorted(off["classes"]) == ["a", "a|b", "b"]  # opaque, as before
    assert EvalSettings().multilabel == "off"  # library callers (benchmark, training scores) keep opaque labels
    # single-label labels under "auto": the same figures as before
    single = _rows(["a", "b", "a", "b"])
    plain = evaluate(single, vectors, EvalSettings(k=2, exclude_same_patient=False), progress=False)
    auto = evaluate(single, vectors, EvalSettings(k=2, exclude_same_patient=False, multilabel="auto"), progress=False)
    assert auto["overall"] == plain["overall"] and "multilabel" not in auto
    # "on" with one-class labels: overlap relevance = same label, so the ranking figures agree
    on = evaluate(single, vectors, EvalSettings(k=2, exclude_same_patient=False, multilabel="on"), progress=False)
    assert {k: on["overall"][k] for k in ("map", "mrr", "p@1", "map@r")} == pytest.approx(
        {k: plain["overall"][k] for k in ("map", "mrr", "p@1", "map@r")}
    )
    with pytest.raises(RetrieveError, match="--multilabel maybe"):
        evaluate(rows, vectors, EvalSettings(multilabel="maybe"), progress=False)


def test_bad_label_in_evaluation_names_the_image():
    rows = _rows(["a|b", "a|", "b", "a"])
    with pytest.raises(RetrieveError, match=r"'a\|' \(image id i1\)"):
        evaluate(rows, _angles([0, 10, 40, 75]), ML, progress=False)


# --- against an independent computation -----------------------------------------------------------------


def _reference(rows, vectors, k):
    """Plain loops: gallery = labelled others of another patient; relevance by Python sets; the vote by
    counting; AP with scikit-learn."""
    sets = [None if not lab else frozenset(lab.split("|")) for lab in rows.label]
    aps, rrs, p5s, map_rs, exact_aps, truth, pred = [], [], [], [], [], [], []
    for q in range(len(rows)):
        if sets[q] is None:
            continue
        g = [j for j in range(len(rows)) if j != q and sets[j] is not None and rows.patient_id[j] != rows.patient_id[q]]
        s = np.array([float(vectors[q] @ vectors[j]) for j in g])
        top = [g[i] for i in np.argsort(-s, kind="stable")[:k]]
        counts = {}
        for j in top:
            for c in sets[j]:
                counts[c] = counts.get(c, 0) + 1
        truth.append(sets[q])
        pred.append({c for c, n in counts.items() if n / len(top) >= 0.5})
        rel = np.array([bool(sets[j] & sets[q]) for j in g])
        if rel.any():
            aps.append(average_precision_score(rel, s))
            ranked = rel[np.argsort(-s)]  # random scores: no ties
            rrs.append(1.0 / (1 + np.flatnonzero(ranked)[0]))
            p5s.append(ranked[:5].mean())
            r = int(rel.sum())
            map_rs.append(sum(ranked[:i].mean() for i in range(1, r + 1) if ranked[i - 1]) / r)
        same = np.array([sets[j] == sets[q] for j in g])
        if same.any():
            exact_aps.append(average_precision_score(same, s))
    mlb = MultiLabelBinarizer(classes=sorted(set().union(*truth)))
    yt, yp = mlb.fit_transform(truth), mlb.transform(pred)
    return {
        "map": float(np.mean(aps)),
        "mrr": float(np.mean(rrs)),
        "p@5": float(np.mean(p5s)),
        "map@r": float(np.mean(map_rs)),
        "exact_map": float(np.mean(exact_aps)),
        "micro": f1_score(yt, yp, average="micro", zero_division=0),
        "macro": f1_score(yt, yp, average="macro", zero_division=0),
        "per_class": f1_score(yt, yp, average=None, zero_division=0),
        "exact_match": float(np.mean([t == p for t, p in zip(truth, pred)])),
    }


@pytest.mark.parametrize("k", [3, 5])
def test_matches_sklearn_on_generated_data(k):
    rng = np.random.default_rng(3)
    n, combos = 48, ["liver", "kidney", "spleen", "liver|kidney", "kidney|spleen", "liver|kidney|spleen"]
    labels = [combos[i] for i in rng.integers(len(combos), size=n)]
    labels[5] = ""  # unlabelled: neither queries nor is a candidate
    centre = {c: rng.normal(size=6) for c in ("liver", "kidney", "spleen")}
    x = np.stack(
        [sum((centre[c] for c in lab.split("|")), np.zeros(6)) if lab else np.zeros(6) for lab in labels]
    ) + rng.normal(scale=1.0, size=(n, 6))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rows = _rows(labels, [f"p{j // 3}" for j in range(n)])
    settings = EvalSettings(k=k, exclude_same_patient=True, exclude_near_dup=True, multilabel="auto")
    res = evaluate(rows, x, settings, progress=False)
    ref = _reference(rows, x, k)
    assert {m: res["overall"][m] for m in ("map", "mrr", "p@5", "map@r")} == pytest.approx(
        {m: ref[m] for m in ("map", "mrr", "p@5", "map@r")}
    )
    assert res["exact_set"]["map"] == pytest.approx(ref["exact_map"])
    assert res["overall"]["knn_micro_f1"] == pytest.approx(ref["micro"])
    assert res["overall"]["knn_macro_f1"] == pytest.approx(ref["macro"])
    assert res["overall"]["knn_exact_match"] == pytest.approx(ref["exact_match"])
    assert [res["per_class"][c]["knn_f1"] for c in ("kidney", "liver", "spleen")] == pytest.approx(ref["per_class"])
    assert res["n_labelled"] == n - 1 and res["overall"]["n_vote_queries"] == n - 1


# --- the product: retrieve eval and the query path on a tiny multi-label index ----------------------------


@pytest.fixture
def ml_index(tmp_path):
    """An index built straight from vectors (no encoder): the hand-worked five-image case."""
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet

    rows = _rows(["a|b", "a", "b", "c", "b|c"]).drop(columns=["near_dup_group"])
    rows["path"] = [f"img{j}.png" for j in range(5)]
    rows["patient_id"] = [f"p{j}" for j in range(5)]
    vs = VectorSet(rows, _angles([0, 20, 50, 110, 150]), {"arch": "toy", "dim": 2}, {"name": "toy"})
    build_index_dir(tmp_path / "idx", vs, IndexConfig(kind="flat", gpu=False))
    return tmp_path / "idx"


@pytest.mark.slow
def test_eval_cli_on_a_multilabel_index(tmp_path, capsys, ml_index):
    from conftest import run_cli

    out_json = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", "--index", ml_index, "--k", "2", "--json", out_json, "--quiet")
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["overall"]["map"] == pytest.approx((11 / 12 * 2 + 2.5) / 5)
    assert res["overall"]["knn_micro_f1"] == pytest.approx(14 / 17)
    assert "share at least one class" in out and "micro" in out and "| a | 2 |" in out
    # --multilabel off: the old opaque reading, 5 one-image classes, nothing relevant anywhere
    code, _, err = run_cli(capsys, "eval", "--index", ml_index, "--multilabel", "off", "--quiet")
    assert code == 2 and "no query has a relevant image" in err
    code, _, err = run_cli(capsys, "eval", "--index", ml_index, "--multilabel", "yes", "--quiet")
    assert code == 2 and "--multilabel yes: choose one of auto, on, off" in err and "Traceback" not in err
    # a stored label with an empty class part: one line naming the image, exit 2
    from conftest import assert_one_line_error

    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet

    rows = pd.DataFrame({"id": ["i0", "i1", "i2"], "path": ["a.png", "b.png", "c.png"], "label": ["a|b", "a|", "b"]})
    vs = VectorSet(rows, np.eye(3, dtype=np.float32), {"arch": "toy", "dim": 3}, {"name": "toy"})
    build_index_dir(tmp_path / "bad", vs, IndexConfig(kind="flat", gpu=False))
    code, _, err = run_cli(capsys, "eval", "--index", tmp_path / "bad", "--quiet")
    assert code == 2
    assert_one_line_error(err, "label 'a|' (image id i1): an empty class name")


@pytest.mark.slow
def test_eval_cli_report_on_a_multilabel_index(tmp_path, capsys, ml_index):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "eval", "--index", ml_index, "--k", "2", "--report", tmp_path / "r", "--quiet")
    assert code == 0, err
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "Multi-label: 3 classes in 5 label sets" in summary and (tmp_path / "r" / "pr_curve.png").is_file()


def test_query_path_votes_a_label_set(ml_index):
    from indexer.index_dir import open_index_dir
    from retrieval.pipeline import query_vectors

    idx = open_index_dir(ml_index, use_gpu=False)
    (res,) = query_vectors(idx, ["q"], _angles([40]), 3)
    # neighbours 2 b (cos 10), 1 a (cos 20), 0 a|b (cos 40): a 2/3, b 2/3 -> {a, b}
    assert [h.row_id for h in res.hits] == [2, 1, 0]
    d = res.to_dict()["vote"]
    assert d["labels"] == ["a", "b"] and d["label"] == "a|b"
    assert res.vote.votes == pytest.approx({"b": 2 / 3, "a": 2 / 3}) and d["votes"] == {"b": 0.6667, "a": 0.6667}
    (cases,) = query_vectors(idx, ["q"], _angles([40]), 3, group_by="patient")  # one image per patient here
    assert cases.vote.labels == ["a", "b"] and cases.vote.votes == pytest.approx(res.vote.votes)


def test_query_table_prints_the_label_set(capsys, ml_index):
    from indexer.index_dir import open_index_dir
    from retrieval.cli.query_cmd import _print_result_table
    from retrieval.pipeline import query_vectors

    (res,) = query_vectors(open_index_dir(ml_index, use_gpu=False), ["q"], _angles([40]), 3)
    _print_result_table(res)
    assert "vote: a|b (classes with at least half of the vote; shares: b 0.67, a 0.67)" in capsys.readouterr().out
    (res,) = query_vectors(open_index_dir(ml_index, use_gpu=False), ["q"], _angles([80]), 3)
    _print_result_table(res)  # neighbours 2 b, 3 c, 1 a: every class 1/3
    assert "vote: none (no class has a vote share of at least 0.5)" in capsys.readouterr().out


# --- review findings: a bad label never enters an index; an old index's one is named -----------------------


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)


@pytest.mark.parametrize("name", ["manifest.csv", "labels.csv"])
@pytest.mark.parametrize("bad", ["normal|", "|", "a||b"])
def test_a_dataset_with_an_empty_class_part_is_refused(tmp_path, name, bad):
    from retrieval.data.dataset import load_dataset

    for f in ("a.png", "b.png"):
        _png(tmp_path / f)
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["liver|kidney", bad]}).to_csv(tmp_path / name, index=False)
    with pytest.raises(RetrieveError) as e:
        load_dataset(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / name}: image b.png: label {bad!r} has an empty class name; write several classes as 'a|b' "
        "with no empty part"
    )
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["liver|kidney", "liver"]}).to_csv(tmp_path / name, index=False)
    assert load_dataset(tmp_path).rows["label"].tolist() == ["liver|kidney", "liver"]


def test_a_class_folder_with_an_empty_class_part_is_refused(tmp_path):
    from retrieval.data.dataset import load_dataset

    _png(tmp_path / "liver" / "a.png")
    _png(tmp_path / "kidney||liver" / "b.png")
    with pytest.raises(RetrieveError, match=r"image kidney\|\|liver/b\.png: label 'kidney\|\|liver' has an empty"):
        load_dataset(tmp_path)


@pytest.mark.slow
def test_index_build_refuses_a_manifest_with_an_empty_class_part(tmp_path, capsys):
    from conftest import FAST, assert_one_line_error, run_cli

    for f in ("a.png", "b.png"):
        _png(tmp_path / "data" / f)
    (tmp_path / "data" / "manifest.csv").write_text("path,label\na.png,liver\nb.png,normal|\n")
    code, _, err = run_cli(capsys, "index", "build", tmp_path / "data", "--index", tmp_path / "idx", *FAST)
    assert code == 2
    assert_one_line_error(err, "manifest.csv: image b.png: label 'normal|' has an empty class name")
    assert not (tmp_path / "idx").exists()


def test_a_query_meeting_an_old_index_bad_label_names_the_image(tmp_path):
    """An index built before datasets refused them may hold `a|`: the vote's error names that image."""
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir, open_index_dir
    from indexer.store import VectorSet
    from retrieval.pipeline import query_vectors

    rows = pd.DataFrame(
        {"id": ["i0", "i1", "i2"], "path": ["a.png", "b.png", "c.png"], "label": ["a|b", "a|", "b"], "patient_id": ""}
    )
    vs = VectorSet(rows, np.eye(3, dtype=np.float32), {"arch": "toy", "dim": 3}, {"name": "toy"})
    build_index_dir(tmp_path / "old", vs, IndexConfig(kind="flat", gpu=False))
    idx = open_index_dir(tmp_path / "old", use_gpu=False)
    query = np.array([[0.0, 1.0, 0.1]], dtype=np.float32)  # nearest i1
    with pytest.raises(RetrieveError, match=r"^label 'a\|' \(image id i1\): an empty class name"):
        query_vectors(idx, ["q"], query, 2)
    with pytest.raises(RetrieveError, match=r"^label 'a\|' \(image id i1\): an empty class name"):
        query_vectors(idx, ["q"], query, 2, group_by="patient")
    (res,) = query_vectors(idx, ["q"], np.array([[1.0, 0.0, 0.9]], dtype=np.float32), 2)  # i0, i2: fine
    assert res.vote.labels == ["a", "b"]  # a|b and b: a 1/2, b 2/2
    with pytest.raises(RetrieveError, match=r"label 'a\|' \(neighbour 2\)"):
        knn_vote(["b", "a|"], [0.9, 0.8], multilabel=True)
    with pytest.raises(RetrieveError, match=r"label 'a\|' \(image id x7\)"):
        knn_vote(["b", "a|"], [0.9, 0.8], multilabel=True, ids=["x1", "x7"])


def test_labels_use_the_indexer_splitting():
    from indexer.search import set_members, set_parts

    for text in ["liver", " kidney | liver ", "a|b|a", "a| b |c"]:
        assert label_set(text) == set_members(text) == frozenset(p for p in set_parts(text))
    assert set_parts("a||b ") == ["a", "", "b"] and set_members("a||b") == {"a", "b"}
    with pytest.raises(RetrieveError, match="empty class name"):
        label_set("a||b")
