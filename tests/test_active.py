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
    code, _, err = run_cli(
        capsys, "suggest-labels", "--index", demo_index, "--budget", "3", "--out", out, "--strategy", "bogus"
    )
    assert code == 2
    assert_one_line_error(err, "--strategy bogus: choose one of entropy, mc-dropout, random")


# --- MC-dropout (BALD) and the simulation --------------------------------------------------------------


def _bald_loop(probs):
    """BALD and predictive entropy, one row at a time, from the definitions."""
    t, n, c = len(probs), len(probs[0]), len(probs[0][0])
    bald, pred = [], []
    for i in range(n):
        mean = [sum(probs[s][i][j] for s in range(t)) / t for j in range(c)]
        h_mean = -sum(m * math.log(m) for m in mean if m > 0)
        h_each = [-sum(p * math.log(p) for p in probs[s][i] if p > 0) for s in range(t)]
        bald.append(h_mean - sum(h_each) / t)
        pred.append(h_mean)
    return bald, pred


def test_bald_against_the_definition():
    from retrieval.training.active import mc_dropout_scores

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
    probs[:, 0] = [0.2, 0.3, 0.5]  # every pass agrees: BALD 0, predictive entropy that of the one vector
    probs[:, 1] = [[1.0, 0.0, 0.0]] * 4 + [[0.0, 1.0, 0.0]] * 3  # confident passes that disagree
    bald, pred = mc_dropout_scores(probs)
    want_bald, want_pred = _bald_loop(probs.tolist())
    np.testing.assert_allclose(bald, want_bald, atol=1e-12)
    np.testing.assert_allclose(pred, want_pred, atol=1e-12)
    assert bald[0] == pytest.approx(0.0, abs=1e-12)
    assert bald[1] == pytest.approx(-(4 / 7) * math.log(4 / 7) - (3 / 7) * math.log(3 / 7))


def test_mc_dropout_passes_differ_only_with_dropout():
    import torch

    from retrieval.training.active import mc_dropout_probs, one_thread, train_dropout_head

    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(20, 8)), dtype=torch.float32)
    codes = np.arange(20) % 2
    with one_thread():
        with_drop = train_dropout_head(x, codes, 2, steps=20)
        probs = mc_dropout_probs(with_drop, x, passes=5)
        again = mc_dropout_probs(with_drop, x, passes=5)
        no_drop = train_dropout_head(x, codes, 2, steps=20, dropout=0.0)
        flat = mc_dropout_probs(no_drop, x, passes=3)
    assert probs.shape == (5, 20, 2) and np.allclose(probs.sum(2), 1)
    assert not np.allclose(probs[0], probs[1])
    assert not with_drop.training  # left in eval mode
    np.testing.assert_array_equal(probs, again)  # seeded
    np.testing.assert_allclose(flat[0], flat[2])


def test_suggest_labels_mc_dropout_scores_the_pool_with_bald():
    from retrieval.training.active import bald_scores

    rng = np.random.default_rng(1)
    vectors = np.concatenate([rng.normal(0, 1, (10, 4)) + [4, 0, 0, 0], rng.normal(0, 1, (10, 4)) - [4, 0, 0, 0]])
    labels = ["a"] * 3 + [None] * 7 + ["b"] * 3 + [None] * 7
    rows = _rows(labels)
    out = suggest_labels(rows, vectors, 4, "mc-dropout", seed=3)
    labelled = rows["label"].notna().to_numpy()
    direct = bald_scores(vectors, labelled, rows["label"][labelled].to_numpy(dtype=str), seed=3)
    pool = np.flatnonzero(~labelled)
    best = pool[np.argsort(-direct[pool], kind="stable")[:4]]
    assert out["path"].tolist() == [f"p{i}.png" for i in best]
    np.testing.assert_allclose(out["score"], np.round(direct[best], 4))
    with pytest.raises(RetrieveError, match="--strategy mc-dropout needs labelled images of at least two"):
        suggest_labels(_rows(["a", None, None]), vectors[:3], 1, "mc-dropout")


@pytest.mark.slow
def test_simulation_loop_on_generated_data():
    import torch

    from retrieval.training.active import SimulationSettings, simulate_active_learning

    rng = np.random.default_rng(0)
    n_per, centres = 40, np.eye(3, 16) * 6
    labels = np.repeat(["a", "b", "c"], n_per)
    clean = np.concatenate([rng.normal(0, 1, (n_per, 16)) + c for c in centres])
    views = np.stack([clean, clean + rng.normal(0, 0.1, clean.shape)])
    groups = np.arange(len(labels)) // 2  # pairs of images share a patient
    settings = SimulationSettings(seeds=(0, 1), rounds=3, batch=5, head_steps=60, passes=5, pca_dims=8)
    res = simulate_active_learning(torch.as_tensor(views, dtype=torch.float32), labels, groups, settings)
    assert set(res["curves"]) == {"entropy", "mc-dropout", "random"}
    for runs in res["curves"].values():
        assert len(runs) == 2
        for points in runs:
            assert [p["labelled"] for p in points] == [6, 11, 16, 21]  # 2 per class, then 5 per round
            assert all(0 <= p["map"] <= 1 and 0 <= p["balanced_accuracy"] <= 1 for p in points)
    assert len(res["summary"]["random"]["rounds"]) == 4
    assert res["summary"]["all_labels"]["balanced_accuracy"] > 0.9  # well-separated blobs, every label
    with pytest.raises(RetrieveError, match="--strategies"):
        simulate_active_learning(torch.as_tensor(views), labels, groups, SimulationSettings(strategies=("bogus",)))
