"""Active learning: the kNN-vote entropy against a loop, the suggestion order, the CLI and bad input."""

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, assert_one_line_error, run_cli

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


def test_vote_entropy_ties_rows_and_blocks_against_a_loop():
    """Equal similarities (rows repeating four directions: many exact ties) take the labelled row that comes
    first, as the loop's sort does; scoring some rows only, or in blocks of a few similarities, changes nothing."""
    rng = np.random.default_rng(1)
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]])
    vectors = directions[rng.integers(0, 4, size=40)]
    labelled = rng.random(40) < 0.5
    labels = rng.choice(["a", "b", "c"], size=int(labelled.sum()))
    for k in (1, 2, 4, int(labelled.sum())):
        want = np.array(_entropy_loop(vectors, labelled, labels, k))
        np.testing.assert_allclose(vote_entropy(vectors, labelled, labels, k), want, atol=1e-12)
        rows = np.array([39, 0, 7, 8, 21])
        got = vote_entropy(vectors, labelled, labels, k, rows=rows, block_elems=7)
        np.testing.assert_allclose(got, want[rows], atol=1e-12)


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
    assert list(out.columns) == ["path", "score", "label"] and (out["label"] == "").all()
    assert sorted(suggest_labels(rows, vectors, 3, "random", seed=1)["path"]) == ["p4.png", "p5.png", "p6.png"]
    with pytest.raises(RetrieveError, match="--budget 0"):
        suggest_labels(rows, vectors, 0)
    with pytest.raises(RetrieveError, match="nothing to suggest"):
        suggest_labels(_rows(["a", "b"]), vectors[:2], 1)
    with pytest.raises(RetrieveError, match="at least two classes"):
        suggest_labels(_rows(["a", None, None]), vectors[:3], 1, "entropy")
    # the default, auto: random until two classes are labelled, then esd
    assert suggest_labels(_rows(["a", None, None]), vectors[:3], 1).attrs["strategy"] == "random"
    assert suggest_labels(rows, vectors, 1).attrs["strategy"] == "esd"


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
    assert_one_line_error(err, "--strategy bogus: choose one of auto, entropy, mc-dropout, esd, random")


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


def test_esd_is_the_entropy_of_the_mean_prediction():
    """Paper 002's ESD by hand and against numpy, and a case where it ranks the rows opposite to BALD."""
    from retrieval.training.active import dropout_acquisition

    probs = np.array(
        [  # 4 passes x 3 rows x 2 classes
            [[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]],
            [[0.5, 0.5], [0.0, 1.0], [0.9, 0.1]],
            [[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]],
            [[0.5, 0.5], [0.0, 1.0], [0.7, 0.3]],
        ]
    )
    esd = dropout_acquisition(probs, "esd")
    bald = dropout_acquisition(probs, "mc-dropout")
    mean = probs.mean(0)
    np.testing.assert_allclose(esd, -(mean * np.log(mean)).sum(1), atol=1e-12)  # numpy, directly
    # row 0: every pass says 50/50 (uncertain, but the passes agree): ESD log 2, BALD 0;
    # row 1: confident passes that disagree half and half: ESD log 2 and BALD log 2 (each pass has entropy 0)
    assert esd[0] == pytest.approx(math.log(2)) and bald[0] == pytest.approx(0.0, abs=1e-12)
    assert esd[1] == pytest.approx(math.log(2)) and bald[1] == pytest.approx(math.log(2))
    # row 2: mean (0.8, 0.2); passes' entropies those of (0.9, 0.1) and (0.7, 0.3), two each
    h = lambda q: -q * math.log(q) - (1 - q) * math.log(1 - q)  # noqa: E731
    assert esd[2] == pytest.approx(h(0.8)) and bald[2] == pytest.approx(h(0.8) - (h(0.9) + h(0.7)) / 2)
    # row 2 against row 0: ESD puts row 0 first (0.693 > 0.500), BALD row 2 (0.032 > 0)
    assert esd[0] > esd[2] and bald[2] > bald[0]
    with pytest.raises(RetrieveError, match="entropy"):
        dropout_acquisition(probs, "entropy")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["mc-dropout", "esd"])
def test_suggest_labels_dropout_strategies_score_the_pool(strategy):
    from retrieval.training.active import (
        dropout_acquisition,
        dropout_scores,
        mc_dropout_probs,
        one_thread,
        train_dropout_head,
    )

    rng = np.random.default_rng(1)
    vectors = np.concatenate([rng.normal(0, 1, (10, 4)) + [4, 0, 0, 0], rng.normal(0, 1, (10, 4)) - [4, 0, 0, 0]])
    labels = ["a"] * 3 + [None] * 7 + ["b"] * 3 + [None] * 7
    rows = _rows(labels)
    out = suggest_labels(rows, vectors, 4, strategy, seed=3)
    labelled = rows["label"].notna().to_numpy()
    known = rows["label"][labelled].to_numpy(dtype=str)
    pool = np.flatnonzero(~labelled)
    direct = dropout_scores(vectors, labelled, known, strategy, seed=3, rows=pool)
    best = np.argsort(-direct, kind="stable")[:4]
    assert out["path"].tolist() == [f"p{i}.png" for i in pool[best]]
    np.testing.assert_allclose(out["score"], np.round(direct[best], 4))
    # the same head (150 steps; 4-d vectors are not projected) and passes as the other dropout strategy,
    # only the formula differs
    import torch
    from sklearn.decomposition import PCA

    x = torch.as_tensor(vectors, dtype=torch.float32)
    lab = torch.as_tensor(np.flatnonzero(labelled))
    with one_thread():
        head = train_dropout_head(x[lab], np.array([0, 0, 0, 1, 1, 1]), 2, seed=3, steps=150)
        probs = mc_dropout_probs(head, x[torch.as_tensor(pool)], 20, 3)
    np.testing.assert_allclose(direct, dropout_acquisition(probs, strategy), atol=1e-12)
    # wider vectors: the head sits on their first principal axes, fitted on every row
    wide = np.concatenate([vectors, rng.normal(0, 0.1, (20, 4))], axis=1)
    z = torch.as_tensor(PCA(n_components=2, random_state=3).fit_transform(wide.astype(np.float32)), dtype=torch.float32)
    with one_thread():
        head = train_dropout_head(z[lab], np.array([0, 0, 0, 1, 1, 1]), 2, seed=3, steps=150)
        probs = mc_dropout_probs(head, z[torch.as_tensor(pool)], 20, 3)
    got = dropout_scores(wide, labelled, known, strategy, seed=3, rows=pool, dims=2)
    np.testing.assert_allclose(got, dropout_acquisition(probs, strategy), atol=1e-5)
    with pytest.raises(RetrieveError, match=f"--strategy {strategy} needs labelled images of at least two"):
        suggest_labels(_rows(["a", None, None]), vectors[:3], 1, strategy)


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
    assert set(res["curves"]) == {"entropy", "mc-dropout", "esd", "random"}
    for runs in res["curves"].values():
        assert len(runs) == 2
        for points in runs:
            assert [p["labelled"] for p in points] == [6, 11, 16, 21]  # 2 per class, then 5 per round
            assert all(0 <= p["map"] <= 1 and 0 <= p["balanced_accuracy"] <= 1 for p in points)
    assert len(res["summary"]["random"]["rounds"]) == 4
    assert res["summary"]["all_labels"]["balanced_accuracy"] > 0.9  # well-separated blobs, every label
    with pytest.raises(RetrieveError, match="--strategies"):
        simulate_active_learning(torch.as_tensor(views), labels, groups, SimulationSettings(strategies=("bogus",)))


def test_benchmark_script_refuses_a_bad_strategy_before_any_work(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from active_learning import main

    with pytest.raises(SystemExit) as exc:  # the data folder does not exist: nothing was read
        main([str(tmp_path / "absent"), "--strategies", "entropy,entropy+bogus", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--strategies entropy+bogus: choose from" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- batches spread over patients and over k-means clusters ----------------------------------------------


def _round_robin_loop(scores, groups, n):
    """Oracle: repeatedly take the best remaining row among the groups with the fewest picks so far."""
    picks, count, left = [], {}, list(range(len(scores)))
    while left and len(picks) < n:
        fewest = min(count.get(groups[i], 0) for i in left)
        best = max((i for i in left if count.get(groups[i], 0) == fewest), key=lambda i: (scores[i], -i))
        picks.append(best)
        left.remove(best)
        count[groups[best]] = count.get(groups[best], 0) + 1
    return picks


def test_spread_over_groups_by_hand_and_against_a_loop():
    from retrieval.training.active import spread_over_groups

    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = np.array(["A", "A", "B", "A", "C"])
    # by hand: A's best (0), B's (2), C's (4), then A's second (1) and third (3)
    assert spread_over_groups(scores, groups, 3).tolist() == [0, 2, 4]
    assert spread_over_groups(scores, groups, 5).tolist() == [0, 2, 4, 1, 3]
    assert spread_over_groups(scores, np.arange(5), 2).tolist() == [0, 1]  # one row per group: plain top-n
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, 15).astype(float)  # many ties: they keep the rows' order
        g = rng.integers(0, 5, 15)
        for n in (1, 4, 7, 15):
            assert spread_over_groups(s, g, n).tolist() == _round_robin_loop(s, g, n)


def test_top_per_cluster_by_hand():
    from retrieval.training.active import pick_batch, top_per_cluster

    # three tight bundles of directions (x, y, z axes); the scores say which row of each is best
    v = np.array([[1, 0.01, 0], [1, 0, 0.02], [1, 0.02, 0.01], [0, 1, 0.01], [0.01, 1, 0], [0, 0.02, 1], [0.01, 0, 1]])
    s = np.array([0.5, 0.9, 0.8, 0.3, 0.7, 0.6, 0.2])
    # plain top-3 takes rows 1, 2, 4 (two from the x bundle); one per cluster: 1 (x), 4 (y), 5 (z)
    assert pick_batch(s, 3).tolist() == [1, 2, 4]
    assert top_per_cluster(s, v * 5, 3).tolist() == [1, 4, 5]  # unit vectors: the scale does not matter
    assert pick_batch(s, 3, "kmeans", vectors=v).tolist() == [1, 4, 5]
    assert top_per_cluster(s, v, 7).tolist() == [1, 2, 4, 5, 0, 3, 6]  # no more rows than places: all, best first
    with pytest.raises(RetrieveError, match="--spread bogus"):
        pick_batch(s, 3, "bogus")


def test_top_per_cluster_fitted_on_a_sample():
    """Past `sample` rows, k-means is fitted on a sample and every row joins its nearest centre: still the best
    row of each of three far-apart blobs."""
    from retrieval.training.active import top_per_cluster

    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    which = np.repeat(np.arange(3), 20)
    v = centres[which] + rng.normal(0, 0.01, (60, 3))
    s = rng.random(60)
    want = sorted((np.flatnonzero(which == c)[np.argmax(s[which == c])] for c in range(3)), key=lambda i: -s[i])
    assert top_per_cluster(s, v, 3, sample=15).tolist() == want
    assert len(top_per_cluster(s, v, 20, sample=15)) == 20  # more clusters than the sample: the sample grows
    assert top_per_cluster(s, v, 3).tolist() == want


def test_strategy_names():
    from retrieval.training.active import parse_strategy

    assert parse_strategy("entropy") == ("entropy", "none")
    assert parse_strategy("entropy+patients") == ("entropy", "patients")
    assert parse_strategy("random+kmeans") == ("random", "kmeans")
    for bad in ("bogus", "entropy+bogus"):
        with pytest.raises(RetrieveError, match=re.escape(f"--strategies {bad}:")):
            parse_strategy(bad)


def test_suggest_labels_spread_over_patients():
    # a's near (1, 0), b's near (0, 1); unlabelled: three frames of patient P and one of Q between the classes
    # (equal entropy: ties keep the rows' order), one of R deep in a
    vectors = np.array([[1, 0.05], [1, -0.05], [0.05, 1], [-0.05, 1], [1, 1], [1, 1.01], [1, 0.99], [1, 1.02], [1, 0]])
    rows = _rows(["a", "a", "b", "b", None, None, None, None, None])
    rows["patient_id"] = ["A", "A", "B", "B", "P", "P", "P", "Q", "R"]
    plain = suggest_labels(rows, vectors, 2, "entropy", k=2)
    assert plain["patient_id"].tolist() == ["P", "P"]
    spread = suggest_labels(rows, vectors, 3, "entropy", k=2, spread="patients")
    assert spread["path"].tolist() == ["p4.png", "p7.png", "p8.png"]  # P's first frame, Q, then R
    assert spread["score"].tolist() == pytest.approx([math.log(2), math.log(2), 0.0], abs=1e-4)
    with pytest.raises(RetrieveError, match="--spread sideways"):
        suggest_labels(rows, vectors, 2, spread="sideways")


@pytest.mark.slow
def test_simulation_batches_respect_the_spread(monkeypatch):
    import torch

    import retrieval.training.active as active
    from retrieval.training.active import SimulationSettings, simulate_active_learning

    picked = []  # (spread, the picked rows' groups) of every round
    real = active.pick_batch

    def spy(scores, n, spread="none", groups=None, vectors=None, seed=0):
        best = real(scores, n, spread, groups, vectors, seed)
        picked.append((spread, groups[best].tolist()))
        return best

    monkeypatch.setattr(active, "pick_batch", spy)
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 30)
    clean = np.concatenate([rng.normal(0, 1, (30, 8)) + 3, rng.normal(0, 1, (30, 8)) - 3])
    groups = np.arange(60) // 3  # three frames per patient
    settings = SimulationSettings(
        strategies=("entropy+patients", "entropy+kmeans"), seeds=(0,), rounds=2, batch=4, head_steps=20, passes=3
    )
    res = simulate_active_learning(torch.as_tensor(clean[None], dtype=torch.float32), labels, groups, settings)
    for runs in res["curves"].values():
        assert [p["labelled"] for p in runs[0]] == [4, 8, 12]
    assert [spread for spread, _ in picked] == ["patients", "patients", "kmeans", "kmeans"]
    for _, groups_of_batch in picked[:2]:
        assert len(set(groups_of_batch)) == 4  # one image per patient (of 20 patients, most unlabelled)


@pytest.mark.slow
def test_simulation_can_acquire_as_suggest_labels_does(monkeypatch):
    """acquire_from="index": esd's scores at each round are suggest-labels' own (dropout_scores on the pool's unit
    clean vectors, the labelled ones as training rows), not the round's head's; a misspelt source is refused."""
    import torch

    import retrieval.training.active as active
    from retrieval.training.active import SimulationSettings, dropout_scores, simulate_active_learning

    handed = []  # (labelled pool positions, scores handed to pick_batch) of every round
    real_pick, real_scores = active.pick_batch, active.dropout_scores

    def scores_spy(vectors, labelled, labels, *a, **kw):
        handed.append([vectors, labelled.copy(), labels, a, kw])
        return real_scores(vectors, labelled, labels, *a, **kw)

    def pick_spy(scores, n, spread="none", groups=None, vectors=None, seed=0):
        handed[-1].append(np.array(scores))
        return real_pick(scores, n, spread, groups, vectors, seed)

    monkeypatch.setattr(active, "dropout_scores", scores_spy)
    monkeypatch.setattr(active, "pick_batch", pick_spy)
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 20)
    clean = np.concatenate([rng.normal(0, 1, (20, 6)) + 2 * np.eye(2, 6)[c] for c in range(2)])
    settings = SimulationSettings(
        strategies=("esd",), seeds=(0,), rounds=2, batch=3, head_steps=20, passes=4, pca_dims=4, acquire_from="index"
    )
    res = simulate_active_learning(torch.as_tensor(clean[None], dtype=torch.float32), labels, np.arange(40), settings)
    assert [p["labelled"] for p in res["curves"]["esd"][0]] == [4, 7, 10] and len(handed) == 2
    for vectors, labelled, known, a, kw, scores in handed:
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)  # unit vectors, as an index's
        assert kw["rows"].tolist() == np.flatnonzero(~labelled).tolist() and kw["dims"] == 4
        np.testing.assert_array_equal(scores, dropout_scores(vectors, labelled, known, *a, **kw))
    with pytest.raises(RetrieveError, match="--acquire-from sideways"):
        simulate_active_learning(
            torch.as_tensor(clean[None], dtype=torch.float32), labels, np.arange(40),
            SimulationSettings(strategies=("esd",), seeds=(0,), rounds=1, acquire_from="sideways"),
        )  # fmt: skip


@pytest.mark.slow
def test_simulation_esd_scores_the_same_passes_as_bald(monkeypatch):
    """In the simulation esd and mc-dropout see the same head and passes at the first round (same start);
    each scores them with its own formula, checked here against numpy; esd+kmeans spreads over clusters."""
    import torch

    import retrieval.training.active as active
    from retrieval.training.active import SimulationSettings, simulate_active_learning

    seen = []  # (probs of the passes, spread, scores handed to pick_batch) of every round, in order
    real_probs, real_pick = active.mc_dropout_probs, active.pick_batch

    def probs_spy(*a, **kw):
        out = real_probs(*a, **kw)
        seen.append([out])
        return out

    def pick_spy(scores, n, spread="none", groups=None, vectors=None, seed=0):
        seen[-1] += [spread, np.array(scores)]
        return real_pick(scores, n, spread, groups, vectors, seed)

    monkeypatch.setattr(active, "mc_dropout_probs", probs_spy)
    monkeypatch.setattr(active, "pick_batch", pick_spy)
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 20)
    clean = np.concatenate([rng.normal(0, 1, (20, 8)) + 2 * np.eye(3, 8)[c] for c in range(3)])
    settings = SimulationSettings(
        strategies=("mc-dropout", "esd", "esd+kmeans"), seeds=(0,), rounds=2, batch=3, head_steps=20, passes=4
    )
    res = simulate_active_learning(torch.as_tensor(clean[None], dtype=torch.float32), labels, np.arange(60), settings)
    assert [p["labelled"] for p in res["curves"]["esd+kmeans"][0]] == [6, 9, 12]
    assert len(seen) == 6 and [s[1] for s in seen] == ["none", "none", "none", "none", "kmeans", "kmeans"]
    bald_probs, esd_probs = seen[0][0], seen[2][0]
    np.testing.assert_array_equal(bald_probs, esd_probs)  # round 0: the same head, the same passes
    esd_probs = esd_probs.astype(np.float64)
    mean = esd_probs.mean(0)
    want_esd = -(mean * np.log(np.clip(mean, 1e-300, None))).sum(1)
    each = -(esd_probs * np.log(np.clip(esd_probs, 1e-300, None))).sum(2).mean(0)
    np.testing.assert_allclose(seen[2][2], want_esd, atol=1e-9)
    np.testing.assert_allclose(seen[0][2], want_esd - each, atol=1e-9)
    assert not np.allclose(seen[0][2], seen[2][2])


# --- MC-dropout through a checkpoint's head (`--head CKPT`) ------------------------------------------------


def test_head_dropout_probs_against_numpy():
    import torch

    from retrieval.encoders.base import build_head
    from retrieval.training.active import dropout_masks, head_dropout_probs, head_dropout_scores

    torch.manual_seed(0)
    head = build_head(6, [5, 3])  # Linear(6, 5), ReLU, Linear(5, 3)
    x = torch.randn(7, 6)
    labelled = np.array([True, True, True, False, False, True, False])
    codes = np.array([0, 1, 0, 1])  # classes of rows 0, 1, 2, 5
    masks = torch.tensor([[2.0, 0, 2, 2, 0], [0, 2, 2, 0, 2]])
    got = head_dropout_probs(head, x, labelled, codes, 2, masks, temperature=0.5)
    w1, b1 = head[0].weight.detach().numpy(), head[0].bias.detach().numpy()
    w2, b2 = head[2].weight.detach().numpy(), head[2].bias.detach().numpy()
    xs = x.numpy()
    for t, m in enumerate(masks.numpy()):
        for i in range(7):

            def out(r, m=m):
                z = (np.maximum(w1 @ xs[r] + b1, 0) * m) @ w2.T + b2
                return z / np.linalg.norm(z)

            protos = []
            for c in (0, 1):
                mean = np.mean([out(r) for r, cr in zip([0, 1, 2, 5], codes) if cr == c], axis=0)
                protos.append(mean / np.linalg.norm(mean))
            logits = np.array([out(i) @ p for p in protos]) / 0.5
            want = np.exp(logits) / np.exp(logits).sum()
            np.testing.assert_allclose(got[t, i], want, rtol=1e-5, atol=1e-6)
    # without dropout every pass is the same network: BALD is zero
    known = np.array(["a", "b", "a", "b"])
    flat = head_dropout_scores(head, x, labelled, known, passes=4, rate=0.0)
    np.testing.assert_allclose(flat, 0.0, atol=1e-6)
    assert (head_dropout_scores(head, x, labelled, known, passes=8, rate=0.5) > 1e-6).any()
    # esd from the same passes: the entropy of their mean (without dropout: of the one network's prediction)
    esd_flat = head_dropout_scores(head, x, labelled, known, passes=4, rate=0.0, strategy="esd")
    single = head_dropout_probs(head, x, labelled, codes, 2, torch.ones(1, 5), temperature=0.1)[0]
    np.testing.assert_allclose(esd_flat, -(single * np.log(single)).sum(1), rtol=1e-5)
    masks = dropout_masks(5, 8, 0.5, 0)
    probs = head_dropout_probs(head, x, labelled, codes, 2, masks, temperature=0.1).mean(0)
    esd = head_dropout_scores(head, x, labelled, known, passes=8, rate=0.5, strategy="esd")
    np.testing.assert_allclose(esd, -(probs * np.log(probs)).sum(1), rtol=1e-5)


def _half_labelled_index(tmp_path, demo_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    manifest = pd.read_csv(data / "labels.csv", dtype=str)
    manifest.loc[manifest.index % 2 == 1, "label"] = None
    manifest.to_csv(data / "labels.csv", index=False)
    index = tmp_path / "idx"
    from retrieval.cli.main import main

    assert main(["index", "build", str(data), "--index", str(index), *FAST]) == 0
    return data, index


@pytest.mark.slow
def test_suggest_labels_with_a_trained_head(demo_data, tmp_path, capsys):
    import torch

    from retrieval.config import PreprocessConfig
    from retrieval.data.dataset import load_dataset
    from retrieval.encoders.checkpoint import save_checkpoint
    from retrieval.encoders.registry import create_encoder
    from retrieval.training.active import head_dropout_scores
    from retrieval.training.trainer import attach_head, load_image_tensors

    data, index = _half_labelled_index(tmp_path, demo_data)
    torch.manual_seed(0)
    backbone = create_encoder("imagenet-effnet-lite0")
    ckpt = save_checkpoint(attach_head(backbone, [32, 8]), tmp_path / "head", extra={"training": {"temperature": 0.2}})
    out = tmp_path / "todo.csv"
    code, text, err = run_cli(
        capsys, "suggest-labels", "--index", index, "--budget", "4", "--strategy", "mc-dropout", "--head", ckpt,
        "--out", out, "--seed", "2", "--spread", "none",
    )  # fmt: skip
    assert code == 0, err
    got = pd.read_csv(out)
    assert len(got) == 4 and got["label"].isna().all() and "4 image(s) to label" in text
    # the same BALD from features computed here, in the index's row order
    from indexer.index_dir import open_index_dir

    rows = open_index_dir(index, use_gpu=False).vectors.rows
    pre = PreprocessConfig(image_size=64)
    with torch.no_grad():
        feats = backbone.features(load_image_tensors(rows, pre)[0].float().div(255))
    lab = rows["label"].notna().to_numpy()
    want = head_dropout_scores(
        _ckpt_head(ckpt), feats, lab,
        rows["label"][lab].to_numpy(dtype=str), temperature=0.2, seed=2,
    )  # fmt: skip
    pool = np.flatnonzero(~lab)
    best = pool[np.argsort(-want[pool], kind="stable")[:4]]
    assert got["path"].tolist() == rows["rel_path"].iloc[best].tolist()  # relative to the data root
    np.testing.assert_allclose(got["score"], np.round(want[best], 4), atol=2e-4)
    # esd through the same head: the entropy of the mean of the same passes
    code, _, err = run_cli(
        capsys, "suggest-labels", "--index", index, "--budget", "4", "--strategy", "esd", "--head", ckpt,
        "--out", out, "--seed", "2", "--spread", "none",
    )  # fmt: skip
    assert code == 0, err
    want = head_dropout_scores(
        _ckpt_head(ckpt), feats, lab,
        rows["label"][lab].to_numpy(dtype=str), temperature=0.2, seed=2, strategy="esd",
    )  # fmt: skip
    best = pool[np.argsort(-want[pool], kind="stable")[:4]]
    got = pd.read_csv(out)
    assert got["path"].tolist() == rows["rel_path"].iloc[best].tolist()
    np.testing.assert_allclose(got["score"], np.round(want[best], 4), atol=2e-4)
    assert len(load_dataset(data).rows) == len(rows)


def _ckpt_head(ckpt):
    from retrieval.encoders.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).head


@pytest.mark.slow
def test_suggest_labels_head_bad_input(demo_data, tmp_path, capsys):
    from retrieval.encoders.checkpoint import save_checkpoint
    from retrieval.encoders.registry import create_encoder
    from retrieval.training.trainer import attach_head

    _, index = _half_labelled_index(tmp_path, demo_data)
    other = save_checkpoint(attach_head(create_encoder("cnn5"), [8]), tmp_path / "cnn5")
    out = tmp_path / "todo.csv"
    base = ["suggest-labels", "--index", index, "--budget", "2", "--out", out]
    code, _, err = run_cli(capsys, *base, "--strategy", "mc-dropout", "--head", other)
    assert code == 2
    assert_one_line_error(err, f"--head {other}", "neither this checkpoint nor its backbone")
    no_head = save_checkpoint(create_encoder("imagenet-effnet-lite0"), tmp_path / "plain")
    code, _, err = run_cli(capsys, *base, "--strategy", "mc-dropout", "--head", no_head)
    assert code == 2
    assert_one_line_error(err, "has no projection head")
    code, _, err = run_cli(capsys, *base, "--strategy", "entropy", "--head", other)
    assert code == 2
    assert_one_line_error(err, "--head is for --strategy mc-dropout or esd, not entropy")
    code, _, err = run_cli(capsys, *base, "--spread", "patients")
    assert code == 0, err
    assert pd.read_csv(out)["patient_id"].nunique() == 2
    assert not any(out.parent.glob("*.tmp"))


# --- the CSV names files relative to the index's data root ---------------------------------------------------


def test_manifest_paths_are_relative_to_the_data_root(tmp_path):
    from retrieval.training.active import manifest_paths

    root = tmp_path / "data"
    rows = pd.DataFrame(
        {
            "path": [str(root / "P1" / "a.png"), str(tmp_path / "elsewhere" / "b.png"), "c/d.png"],
            "rel_path": pd.array(["P1/a.png", None, None], dtype="string"),
        }
    )
    got = manifest_paths(rows, str(root))
    assert got.tolist() == ["P1/a.png", "../elsewhere/b.png", "c/d.png"]
    assert (root / got[1]).resolve() == (tmp_path / "elsewhere" / "b.png").resolve()  # the same file, from the root
    # no recorded root: relative paths stay, an absolute one is an error rather than a leaked location
    assert manifest_paths(rows.iloc[[2]].drop(columns="rel_path"), None).tolist() == ["c/d.png"]
    with pytest.raises(RetrieveError, match="stores absolute paths and no data root"):
        manifest_paths(rows.drop(columns="rel_path"), None, "--index old")


@pytest.mark.slow
def test_suggested_paths_go_back_into_the_manifest(demo_data, tmp_path, capsys):
    """The CSV's paths are the manifest's own (relative to the data root, never absolute): its filled-in labels
    join the manifest by path and `index build --labels` by path, and the index keeps working after the data
    and index move together."""
    import shutil

    from retrieval.data.dataset import load_dataset
    from retrieval.labels import join_labels

    data, index = _half_labelled_index(tmp_path, demo_data)
    out = tmp_path / "todo.csv"
    code, _, err = run_cli(capsys, "suggest-labels", "--index", index, "--budget", "5", "--out", out)
    assert code == 0, err
    todo = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(todo.columns) == ["path", "frame_index", "patient_id", "score", "label"]
    manifest = pd.read_csv(data / "labels.csv", dtype=str)
    unlabelled = set(manifest.loc[manifest["label"].isna(), "path"])
    assert set(todo["path"]) <= unlabelled  # the manifest's own strings
    assert not any(Path(p).is_absolute() or str(tmp_path) in p for p in todo["path"])
    assert str(tmp_path) not in out.read_text()
    # a person fills in the labels; they go onto the manifest's rows of those paths
    todo["label"] = "grade0"
    manifest = manifest.set_index("path")
    manifest.loc[todo["path"], "label"] = "grade0"
    manifest.reset_index().to_csv(data / "labels.csv", index=False)
    rows = load_dataset(data).rows
    by_rel = dict(zip(rows["id"], rows["label"]))
    assert all(by_rel[p] == "grade0" for p in todo["path"])
    # or as an `index build --labels` CSV (joined by path, relative to the data root)
    todo[["path", "label"]].to_csv(tmp_path / "new.csv", index=False)
    joined, report = join_labels(rows, tmp_path / "new.csv", data)
    assert report.labelled == 5 and not report.unknown_keys
    # data and index moved as one: the same relative paths
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(data), moved / "data")
    shutil.move(str(index), moved / "idx")
    code, _, err = run_cli(capsys, "suggest-labels", "--index", moved / "idx", "--budget", "5", "--out", out)
    assert code == 0, err
    again = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert set(again["path"]) <= set(manifest.index) and str(moved) not in out.read_text()
