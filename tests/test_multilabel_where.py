"""Multi-label labels (`kidney|liver`) where a user meets them: `--where label=liver` keeps every image whose
label set names liver (query, index remove), and `retrieve query --out` writes the query's own label in the
same set text as the vote. Hand-worked cases; single-label filters keep their exact-text meaning."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, assert_one_line_error, run_cli

from indexer.errors import RetrieveError
from indexer.search import candidate_mask, holds_sets, set_members

LABELS = ["liver", "kidney|liver", " liver | spleen", None, "kidney", "", "spleen|kidney|liver"]


def _rows(labels):
    return pd.DataFrame({"label": labels, "patient_id": [f"p{j}" for j in range(len(labels))]})


def _hits(mask):
    return [] if mask is None else np.flatnonzero(mask).tolist()


def test_set_members_and_holds_sets():
    assert set_members(" liver | kidney") == {"kidney", "liver"} == set_members("kidney|liver|kidney")
    assert set_members("liver") == {"liver"} and set_members("a||b|") == {"a", "b"}
    assert holds_sets(pd.Series(["a", None, "a|b"])) and not holds_sets(pd.Series(["a", None, "b"]))


def test_where_on_a_label_set_column_is_membership_worked_by_hand():
    rows = _rows(LABELS)
    # rows 0 liver, 1 kidney|liver, 2 liver|spleen, 3 -, 4 kidney, 5 '', 6 kidney|liver|spleen
    assert _hits(candidate_mask(rows, [], [("label", "liver")])) == [0, 1, 2, 6]
    assert _hits(candidate_mask(rows, [], [("label", "kidney")])) == [1, 4, 6]
    # several classes: the rows naming all of them, whatever the order and spaces
    assert _hits(candidate_mask(rows, [], [("label", "kidney|liver")])) == [1, 6]
    assert _hits(candidate_mask(rows, [], [("label", " liver |kidney")])) == [1, 6]
    assert _hits(candidate_mask(rows, [], [("label", "spleen|liver|kidney")])) == [6]
    # an empty value keeps meaning "no value" (unlabelled rows), as on any column
    assert _hits(candidate_mask(rows, [], [("label", "")])) == [3, 5]
    # combined with a patient exclusion and a second condition
    assert _hits(candidate_mask(rows, ["p1"], [("label", "liver"), ("label", "kidney")])) == [6]


def test_where_on_a_single_label_column_is_unchanged():
    labels = ["liver", "kidney", " liver", None, "liver"]
    rows = _rows(labels)
    exact = [j for j, lab in enumerate(labels) if lab == "liver"]  # exact text, as before
    assert _hits(candidate_mask(rows, [], [("label", "liver")])) == exact == [0, 4]
    with pytest.raises(RetrieveError, match=r"unknown label 'kidney\|liver' \(values in the index:  liver, kidney"):
        candidate_mask(rows, [], [("label", "kidney|liver")])  # no set column: the text itself is unknown
    with pytest.raises(RetrieveError, match=r"^--where label=lung: unknown label 'lung' \(values in the index:"):
        candidate_mask(rows, [], [("label", "lung")])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lung", "--where label=lung: unknown label 'lung' (values in the index's label sets: kidney, liver, spleen)"),
        ("liver|lung", "--where label=liver|lung: unknown label 'lung' (values in the index's label sets:"),
        ("liver|", "--where label=liver|: an empty part; label holds sets, so give one value or several as 'a|b'"),
    ],
)
def test_bad_class_on_a_label_set_column_is_one_line(value, message):
    with pytest.raises(RetrieveError) as e:
        candidate_mask(_rows(LABELS), [], [("label", value)])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_classes_that_never_meet_are_an_error_not_an_empty_answer():
    rows = _rows(["kidney|liver", "spleen", "liver"])
    with pytest.raises(
        RetrieveError, match=r"^--where label=liver\|spleen: no image's label names all of liver, spleen$"
    ):
        candidate_mask(rows, [], [("label", "liver|spleen")])


# --- on an index: query_vectors, index remove -------------------------------------------------------------


def _angles(degrees):
    t = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


@pytest.fixture
def ml_index(tmp_path):
    """Five unit vectors at 0, 20, 50, 110, 150 degrees labelled a|b, a, b, c, b|c (one patient each)."""
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet

    rows = pd.DataFrame(
        {
            "id": [f"i{j}" for j in range(5)],
            "path": [f"img{j}.png" for j in range(5)],
            "label": ["a|b", "a", "b", "c", "b|c"],
            "patient_id": [f"p{j}" for j in range(5)],
        }
    )
    vs = VectorSet(rows, _angles([0, 20, 50, 110, 150]), {"arch": "toy", "dim": 2}, {"name": "toy"})
    build_index_dir(tmp_path / "idx", vs, IndexConfig(kind="flat", gpu=False))
    return tmp_path / "idx"


def test_filtered_query_on_a_multilabel_index(ml_index):
    from indexer.index_dir import open_index_dir
    from retrieval.pipeline import query_vectors

    idx = open_index_dir(ml_index, use_gpu=False)
    # query at 100 degrees, only rows naming b: b|c (150, cos 50), b (50, cos 50), a|b (0, cos 100)
    (res,) = query_vectors(idx, ["q"], _angles([100]), 3, where=[("label", "b")])
    assert sorted(h.row_id for h in res.hits[:2]) == [2, 4] and res.hits[2].row_id == 0 and res.matched == 3
    # the vote over those three: b 3/3, c 1/3, a 1/3 -> {b}
    assert res.vote.labels == ["b"] and res.vote.votes["b"] == pytest.approx(1.0)
    (res,) = query_vectors(idx, ["q"], _angles([100]), 5, where=[("label", "c|b")])
    assert [h.row_id for h in res.hits] == [4] and res.matched == 1
    with pytest.raises(RetrieveError, match="unknown label 'd'"):
        query_vectors(idx, ["q"], _angles([100]), 3, where=[("label", "d")])


def test_index_remove_where_a_class(tmp_path, capsys, ml_index):
    from indexer.index_dir import open_index_dir

    code, out, err = run_cli(capsys, "index", "remove", "--index", ml_index, "--where", "label=c")
    assert code == 0, err
    assert "removed 2 images (b|c: 1, c: 1); index now holds 3" in out  # c and b|c, each value counted
    assert open_index_dir(ml_index, use_gpu=False).rows["label"].tolist() == ["a|b", "a", "b"]
    code, _, err = run_cli(capsys, "index", "remove", "--index", ml_index, "--where", "label=c")
    assert code == 2
    assert_one_line_error(err, "--where label=c: unknown label 'c' (values in the index's label sets: a, b)")


# --- retrieve query on a multi-label index built from images ----------------------------------------------


@pytest.fixture(scope="module")
def ml_image_index(tmp_path_factory, demo_data):
    """The demo images labelled as sets: every fatty grade also names `steatosis` (`mild|steatosis`, ...);
    normal images stay `normal`."""
    from retrieval.cli.main import main

    root = tmp_path_factory.mktemp("mlq")
    table = pd.read_csv(demo_data / "labels.csv")
    table["label"] = [lab if lab == "normal" else f"steatosis|{lab}" for lab in table["label"]]
    table[["path", "label"]].to_csv(root / "labels.csv", index=False)
    index = root / "index"
    assert (
        main(["index", "build", str(demo_data), "--index", str(index), "--labels", str(root / "labels.csv"), *FAST])
        == 0
    )
    return index


@pytest.mark.slow
def test_query_where_and_out_on_a_multilabel_index(tmp_path, capsys, demo_data, ml_image_index):
    from retrieval.labels import label_set, set_text

    normal = demo_data / "normal" / "SYN000_f0.png"
    code, out, err = run_cli(
        capsys, "query", normal, "--index", ml_image_index, "--k", "5", "--where", "label=steatosis", "--json"
    )
    assert code == 0, err
    res = json.loads(out)
    assert len(res["results"]) == 5 and all("steatosis" in x["label"].split("|") for x in res["results"])
    assert res["matched"] == 18 and "steatosis" in res["vote"]["labels"]
    code, _, err = run_cli(capsys, "query", normal, "--index", ml_image_index, "--where", "label=cirrhosis")
    assert code == 2
    assert_one_line_error(err, "--where label=cirrhosis: unknown label 'cirrhosis'", "mild, moderate, normal")

    # --out: query_label in the vote's set text (sorted, '|'), whatever order and spaces the manifest used
    manifest = tmp_path / "queries.csv"
    pd.DataFrame(
        {
            "path": [
                str(demo_data / "mild" / "SYN100_f0.png"),
                str(normal),
                str(demo_data / "severe" / "SYN300_f2.png"),
            ],
            "label": [" steatosis | mild", "normal", "severe|steatosis"],
        }
    ).to_csv(manifest, index=False)
    out_csv = tmp_path / "answers.csv"
    code, _, err = run_cli(
        capsys, "query", manifest, "--index", ml_image_index, "--k", "4", "--out", out_csv, "--quiet"
    )
    assert code == 0, err
    table = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
    per_query = table.groupby("query", sort=False)
    assert [g["query_label"].iloc[0] for _, g in per_query] == ["mild|steatosis", "normal", "severe|steatosis"]
    for _, g in per_query:
        assert len(g) == 4 and g["query_label"].nunique() == 1
        # the vote, recomputed from the written neighbours: classes named by at least half of them
        sets = [label_set(lab) for lab in g["label"]]
        expected = set_text(c for c in set().union(*sets) if sum(c in s for s in sets) >= len(sets) / 2)
        assert g["vote_label"].iloc[0] == expected


def test_query_labels_in_set_text(caplog):
    from retrieval.batch import query_set_texts

    labels = [" kidney | liver", "liver|kidney|liver", None, "", "liver", "liver|"]
    with caplog.at_level("INFO", logger="retrieval.batch"):
        out = query_set_texts(labels, ["q0", "q1", "q2", "q3", "q4", "q5"])
    assert out == ["kidney|liver", "kidney|liver", None, "", "liver", "liver|"]  # a bad label is kept as written
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and notes[0].startswith("query q5: label 'liver|'") and "written as given" in notes[0]


# --- review findings: set matching only on `label`, the exact form `label==`, the remove breakdown ----------


def test_a_free_text_column_with_a_bar_keeps_exact_text():
    """A manifest's free-text column (`ABDOMEN | LIVER`) is text, not a set: body_part=ABDOMEN keeps only the
    rows whose text is ABDOMEN, whatever other rows hold."""
    rows = pd.DataFrame(
        {
            "label": ["a", "b", "a", "b"],
            "body_part": ["ABDOMEN | LIVER", "ABDOMEN", "ABDOMEN", "CHEST"],
            "patient_id": ["p0", "p1", "p2", "p3"],
        }
    )
    assert _hits(candidate_mask(rows, [], [("body_part", "ABDOMEN")])) == [1, 2]
    assert _hits(candidate_mask(rows, [], [("body_part", "ABDOMEN | LIVER")])) == [0]
    with pytest.raises(RetrieveError, match=r"^--where body_part=LIVER: unknown body_part 'LIVER' \(values in the "):
        candidate_mask(rows, [], [("body_part", "LIVER")])
    assert not holds_sets(rows["body_part"]) and holds_sets(rows["body_part"].rename("label"))
    assert not holds_sets(rows["body_part"], "body_part") and holds_sets(pd.Series(["a|b"]), "label")


def test_parse_where_exact_form():
    from indexer.search import parse_where

    assert parse_where(["label==liver", "label = kidney", "label== kidney | liver", "label==", "x=a=b"]) == [
        ("label", "=liver"),
        ("label", "kidney"),
        ("label", "=kidney | liver"),
        ("label", "="),
        ("x", "a=b"),
    ]


def test_exact_label_set_worked_by_hand():
    from indexer.search import parse_where

    rows = _rows(LABELS)
    # rows 0 liver, 1 kidney|liver, 2 liver|spleen, 3 -, 4 kidney, 5 '', 6 kidney|liver|spleen

    def exact(value):
        return _hits(candidate_mask(rows, [], parse_where([f"label=={value}"])))

    assert exact("liver") == [0]  # not kidney|liver, liver|spleen, kidney|liver|spleen
    assert exact("kidney") == [4]
    assert exact("liver|kidney") == exact(" kidney | liver ") == [1]
    assert exact("spleen|liver") == [2]  # stored as ' liver | spleen': spaces and order normalised
    assert exact("liver|spleen|kidney") == [6]
    assert exact("") == [3, 5]  # no value, as label=
    assert exact("kidney|liver|kidney") == [1]  # repeats count once
    with pytest.raises(RetrieveError, match=r"^--where label==spleen: no image's label is exactly \{spleen\}$"):
        exact("spleen")
    with pytest.raises(RetrieveError, match=r"^--where label==lung: unknown label 'lung' \(values in the index's"):
        exact("lung")
    with pytest.raises(RetrieveError, match=r"^--where label==liver\|: an empty part"):
        exact("liver|")
    # a single-label column: the set {liver} is the label liver
    single = _rows(["liver", "kidney", "liver", None])
    assert _hits(candidate_mask(single, [], parse_where(["label==liver"]))) == [0, 2]
    # any other column: == is its exact text, as =
    assert _hits(candidate_mask(rows, [], parse_where(["patient_id==p4"]))) == [4]
    with pytest.raises(RetrieveError, match=r"^--where patient_id==p9: unknown patient_id 'p9'"):
        candidate_mask(rows, [], parse_where(["patient_id==p9"]))


def test_exact_form_in_a_query(ml_index):
    from indexer.index_dir import open_index_dir
    from indexer.search import parse_where
    from retrieval.pipeline import query_vectors

    idx = open_index_dir(ml_index, use_gpu=False)
    # a|b, a, b, c, b|c: label==b is the row labelled b only; label==c|b the row b|c
    (res,) = query_vectors(idx, ["q"], _angles([100]), 5, where=parse_where(["label==b"]))
    assert [h.row_id for h in res.hits] == [2] and res.matched == 1
    (res,) = query_vectors(idx, ["q"], _angles([100]), 5, where=parse_where(["label== c | b"]))
    assert [h.row_id for h in res.hits] == [4] and res.matched == 1


def _free_text_index(path):
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet

    rows = pd.DataFrame(
        {
            "id": [f"i{j}" for j in range(4)],
            "path": [f"img{j}.png" for j in range(4)],
            "label": ["a", "b", "a", "b"],
            "patient_id": [f"p{j}" for j in range(4)],
            "body_part": ["ABDOMEN | LIVER", "ABDOMEN", "ABDOMEN", "CHEST"],
        }
    )
    vs = VectorSet(rows, _angles([0, 30, 60, 90]), {"arch": "toy", "dim": 2}, {"name": "toy"})
    build_index_dir(path, vs, IndexConfig(kind="flat", gpu=False))
    return path


def test_index_remove_on_a_free_text_column_removes_the_exact_rows(tmp_path, capsys):
    from indexer.index_dir import open_index_dir

    index = _free_text_index(tmp_path / "idx")
    code, out, err = run_cli(capsys, "index", "remove", "--index", index, "--where", "body_part=ABDOMEN")
    assert code == 0, err
    assert out.strip() == "removed 2 images; index now holds 2"  # one value matched: no breakdown
    assert open_index_dir(index, use_gpu=False).rows["body_part"].tolist() == ["ABDOMEN | LIVER", "CHEST"]


def test_index_remove_exact_and_breakdown(ml_index, capsys):
    from indexer.index_dir import open_index_dir

    code, out, err = run_cli(capsys, "index", "remove", "--index", ml_index, "--where", "label==a")
    assert code == 0, err
    assert out.strip() == "removed 1 images; index now holds 4"  # only the row labelled exactly a (not a|b)
    assert open_index_dir(ml_index, use_gpu=False).rows["label"].tolist() == ["a|b", "b", "c", "b|c"]
    code, out, err = run_cli(capsys, "index", "remove", "--index", ml_index, "--where", "label=b")
    assert code == 0, err
    assert out.strip() == "removed 3 images (a|b: 1, b: 1, b|c: 1); index now holds 1"
    code, _, err = run_cli(capsys, "index", "remove", "--index", ml_index, "--where", "label==b")
    assert code == 2
    assert_one_line_error(err, "--where label==b: unknown label 'b' (values in the index's label sets: c)")


def test_index_remove_breakdown_is_capped(tmp_path, capsys):
    from indexer.config import IndexConfig
    from indexer.index_dir import build_index_dir
    from indexer.store import VectorSet

    labels = ["x|a", "x|b", "x|c", "x|d", "x|e", "x|e", "x", "y"]
    rows = pd.DataFrame(
        {"id": [f"i{j}" for j in range(8)], "path": [f"{j}.png" for j in range(8)], "label": labels, "patient_id": "p"}
    )
    vs = VectorSet(rows, _angles(np.arange(8) * 10), {"arch": "toy", "dim": 2}, {"name": "toy"})
    build_index_dir(tmp_path / "idx", vs, IndexConfig(kind="flat", gpu=False))
    code, out, err = run_cli(capsys, "index", "remove", "--index", tmp_path / "idx", "--where", "label=x")
    assert code == 0, err
    # 7 images name x: x|e twice, then the five others once each (in text order), four values shown
    assert out.strip() == "removed 7 images (x|e: 2, x: 1, x|a: 1, x|b: 1, 2 other values: 2); index now holds 1"


def test_index_remove_breakdown_counts_only_where_matches(ml_index, capsys):
    """--id and --where together: the breakdown is of the images --where matched, not of those named by id."""
    code, out, err = run_cli(capsys, "index", "remove", "--index", ml_index, "--where", "label=b", "--id", "i3")
    assert code == 0, err
    # label=b: a|b, b, b|c; --id i3: c (not in the breakdown)
    assert out.strip() == "removed 4 images (a|b: 1, b: 1, b|c: 1); index now holds 1"


@pytest.mark.slow
def test_exact_form_in_query_and_serve(capsys, demo_data, ml_image_index):
    """label==steatosis|mild: only the images labelled exactly {mild, steatosis} (6 of the demo's 24), in
    `retrieve query` and in the server's engine (the same conditions)."""
    from retrieval.server.engine import load_engine

    normal = demo_data / "normal" / "SYN000_f0.png"
    code, out, err = run_cli(
        capsys, "query", normal, "--index", ml_image_index, "--k", "8", "--where", "label== steatosis | mild", "--json"
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["matched"] == 6 and {x["label"] for x in res["results"]} == {"steatosis|mild"}
    code, out, err = run_cli(capsys, "query", normal, "--index", ml_image_index, "--where", "label=mild", "--json")
    assert code == 0 and json.loads(out)["matched"] == 6  # membership: the same six here
    code, _, err = run_cli(capsys, "query", normal, "--index", ml_image_index, "--where", "label==steatosis")
    assert code == 2
    assert_one_line_error(err, "--where label==steatosis: no image's label is exactly {steatosis}")
    engine = load_engine(ml_image_index, use_gpu=False)
    answer = engine.query(normal, "n.png", 8, where=["label==mild|steatosis"])
    assert isinstance(answer, dict) and answer["matched"] == 6
    assert {x["label"] for x in answer["results"]} == {"steatosis|mild"}
    with pytest.raises(RetrieveError, match="no image's label is exactly"):
        engine.query(normal, "n.png", 8, where=["label==steatosis"])
