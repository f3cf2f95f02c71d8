"""Active learning: the kNN-vote entropy against a loop, the suggestion order, the CLI and bad input."""

import math

import numpy as np
import pandas as pd
import pytest
from conftest import assert_one_line_error, run_cli

from retrieval.errors import RetrieveError
from retrieval.training.active import suggest_labels, vote_entropy


def _entropy_loop(vectors, labelled, labels, k):
    lab_idx = [i for i in range(len(vectors)) if labelled[i]]
    lab_of = dict(zip(lab_idx, labels))
    out = []
    for i, v in enumerate(vectors):
        sims = []
        for j in lab_idx:
            if j != i:
                cos = float(v @ vectors[j] / (np.linalg.norm(v) * np.linalg.norm(vectors[j])))
                sims.append((-cos, j))
        votes = [lab_of[j] for _, j in sorted(sims)[:k]]
        ps = [votes.count(c) / len(votes) for c in set(votes)]
        out.append(-sum(p * math.log(p) for p in ps))
    return out


def test_vote_entropy_against_a_loop():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 5))
    labelled = np.array([True] * 7 + [False] * 5)
    labels = np.array(["a", "b", "a", "c", "b", "a", "c"])
    for k in (1, 3, 5):
        np.testing.assert_allclose(
            vote_entropy(vectors, labelled, labels, k), _entropy_loop(vectors, labelled, labels, k)
        )


def _rows(labels):
    return pd.DataFrame(
        {
            "id": [f"i{j}" for j in range(len(labels))],
            "path": [f"p{j}.png" for j in range(len(labels))],
            "label": pd.array(labels, dtype="string"),
        }
    )


def test_entropy_suggests_the_images_between_classes():
    # labelled a's near (1, 0), b's near (0, 1); unlabelled: deep in a, deep in b, halfway
    vectors = np.array([[1, 0.05], [1, -0.05], [0.05, 1], [-0.05, 1], [1, 0.01], [0.01, 1], [1, 1]], float)
    rows = _rows(["a", "a", "b", "b", None, None, None])
    out = suggest_labels(rows, vectors, 1, "entropy", k=2)
    assert out["path"].tolist() == ["p6.png"] and out["score"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert list(out.columns) == ["id", "path", "score", "label"] and (out["label"] == "").all()
    assert sorted(suggest_labels(rows, vectors, 3, "random", seed=1)["path"]) == ["p4.png", "p5.png", "p6.png"]
    with pytest.raises(RetrieveError, match="--budget 0"):
        suggest_labels(rows, vectors, 0)
    with pytest.raises(RetrieveError, match="nothing to suggest"):
        suggest_labels(_rows(["a", "b"]), vectors[:2], 1)
    with pytest.raises(RetrieveError, match="at least two classes"):
        suggest_labels(_rows(["a", None, None]), vectors[:3], 1)


@pytest.mark.slow
def test_suggest_labels_cli(demo_index, tmp_path, capsys):
    out = tmp_path / "todo.csv"
    # every image of the demo index is labelled: a one-line error
    code, _, err = run_cli(capsys, "suggest-labels", "--index", demo_index, "--budget", "3", "--out", out)
    assert code == 2
    assert_one_line_error(err, "nothing to suggest")
