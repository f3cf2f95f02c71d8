"""Metrics against scikit-learn and against small cases worked by hand."""

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from retrieval.evaluation.metrics import (
    PR_RECALL_LEVELS,
    average_precision,
    interpolated_pr,
    map_at_r,
    pessimistic_order,
    precision_at_k,
    reciprocal_rank,
)


def test_ap_hand_worked():
    # ranking: R N R N N  -> precision at hits 1/1, 2/3 -> AP = (1 + 2/3) / 2
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    rel = np.array([1, 0, 1, 0, 0], bool)
    assert average_precision(scores, rel) == pytest.approx((1 + 2 / 3) / 2)


def test_ap_denominator_is_all_relevant_items_in_gallery():
    # relevant item ranked last still counts: R N N R -> (1 + 2/4) / 2
    assert average_precision(np.array([4.0, 3, 2, 1]), np.array([1, 0, 0, 1], bool)) == pytest.approx(0.75)


def test_ap_ties_as_sklearn():
    # a tied group {R, N} at the top, then R: sklearn takes precision at the group's end (1/2)
    scores = np.array([0.9, 0.9, 0.5])
    rel = np.array([1, 0, 1], bool)
    expected = 0.5 * 0.5 + 0.5 * (2 / 3)
    assert average_precision(scores, rel) == pytest.approx(expected)
    assert average_precision(scores, rel) == pytest.approx(average_precision_score(rel, scores))
    # the order of items inside a tie does not change AP
    assert average_precision(scores[[1, 0, 2]], rel[[1, 0, 2]]) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(25))
def test_ap_matches_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    rel = rng.random(n) < rng.uniform(0.1, 0.7)
    rel[rng.integers(n)] = True
    scores = np.round(rng.random(n), 1 if seed % 2 else 6)  # odd seeds: many ties
    assert average_precision(scores, rel) == pytest.approx(average_precision_score(rel, scores), abs=1e-12)


def test_no_relevant_item_is_undefined():
    with pytest.raises(ValueError):
        average_precision(np.array([0.3, 0.2]), np.array([False, False]))


def test_rank_metrics_hand_worked():
    ranked = pessimistic_order(np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 1, 1, 0], bool))
    assert ranked.tolist() == [False, True, True, False]
    assert reciprocal_rank(ranked) == pytest.approx(0.5)
    assert precision_at_k(ranked, 1) == 0.0
    assert precision_at_k(ranked, 3) == pytest.approx(2 / 3)
    assert precision_at_k(ranked, 10) == pytest.approx(0.5)  # k capped at the gallery size
    # MAP@R: R = 2, top 2 = N R -> (0 + 1/2 * 1) / 2
    assert map_at_r(ranked) == pytest.approx(0.25)


def test_ties_break_against_the_engine():
    # relevant and irrelevant tied at the top: the irrelevant one ranks first
    ranked = pessimistic_order(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0], bool))
    assert ranked.tolist() == [False, True, False]
    assert reciprocal_rank(ranked) == 0.5


def test_reciprocal_rank_without_hit():
    assert reciprocal_rank(np.array([False, False])) == 0.0


def test_interpolated_pr():
    # R N R: precision 1, .5, .667; recall .5, .5, 1 -> interpolated: 1 up to recall .5, .667 beyond
    curve = interpolated_pr(np.array([3.0, 2, 1]), np.array([1, 0, 1], bool), np.array([0.0, 0.5, 0.51, 1.0]))
    assert curve == pytest.approx([1.0, 1.0, 2 / 3, 2 / 3])


def _sklearn_interpolated(scores, rel, levels):
    """Oracle: max precision over sklearn's operating points (less its recall-0 end point) with recall >= level."""
    precision, recall, _ = precision_recall_curve(rel, scores)
    precision, recall = precision[:-1], recall[:-1]
    n_rel = rel.sum()
    # recall reaches a level i/100 exactly when tp * 100 >= i * n_rel (integers, no rounding)
    tp = np.rint(recall * n_rel)
    return np.array([precision[tp * 100 >= round(level * 100) * n_rel].max(initial=0.0) for level in levels])


def test_interpolated_pr_ties_form_one_threshold():
    # scores 3, 2, 2, 1 with R, R, N, R: the tie {R, N} is one threshold (recall 2/3, precision 2/3);
    # a stable sort would also offer the point (recall 2/3, precision 1) inside the tie
    scores, rel = np.array([3.0, 2, 2, 1]), np.array([1, 1, 0, 1], bool)
    curve = interpolated_pr(scores, rel, np.array([0.0, 1 / 3, 0.5, 2 / 3, 0.9, 1.0]))
    assert curve == pytest.approx([1.0, 1.0, 3 / 4, 3 / 4, 3 / 4, 3 / 4])
    # the order inside the tie does not matter
    assert interpolated_pr(scores[[0, 2, 1, 3]], rel[[0, 2, 1, 3]], np.array([0.5])) == pytest.approx([3 / 4])


def test_interpolated_pr_keeps_a_recall_equal_to_a_level():
    # 20 relevant: recall 7/20 = 0.35 must reach the level 0.35, also when the level comes from linspace
    rel = np.array([1] * 7 + [0] * 3 + [1] * 13 + [0] * 7, bool)
    scores = -np.arange(len(rel), dtype=float)
    assert interpolated_pr(scores, rel, np.array([0.35])) == pytest.approx([1.0])
    assert interpolated_pr(scores, rel, np.linspace(0, 1, 101)[[35]]) == pytest.approx([1.0])
    assert interpolated_pr(scores, rel, np.array([0.36])) == pytest.approx([20 / 23])


def test_pr_levels_are_exact_hundredths():
    assert PR_RECALL_LEVELS[35] == 0.35 == 7 / 20
    assert len(PR_RECALL_LEVELS) == 101 and PR_RECALL_LEVELS[0] == 0.0 and PR_RECALL_LEVELS[-1] == 1.0


@pytest.mark.parametrize("seed", range(30))
def test_interpolated_pr_matches_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    rel = rng.random(n) < rng.uniform(0.1, 0.7)
    rel[rng.integers(n)] = True
    scores = np.round(rng.random(n), 1 if seed % 2 else 6)  # odd seeds: many ties
    expected = _sklearn_interpolated(scores, rel, PR_RECALL_LEVELS)
    assert interpolated_pr(scores, rel) == pytest.approx(expected, abs=1e-12)


def test_interpolated_pr_needs_a_relevant_item():
    with pytest.raises(ValueError):
        interpolated_pr(np.array([0.3, 0.2]), np.array([False, False]))


_PML_SCRIPT = """
import json, sys
import numpy as np, torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
data = np.load(sys.argv[1])
results = []
for seed in range(len(data.files) // 2):
    x, labels = data[f"x{seed}"], data[f"labels{seed}"]
    calc = AccuracyCalculator(
        include=("mean_average_precision", "mean_average_precision_at_r", "precision_at_1", "mean_reciprocal_rank"),
        k=len(x) - 1,  # every other image retrieved, as in our leave-one-out gallery
    )
    results.append({k: float(v) for k, v in calc.get_accuracy(torch.tensor(x), torch.tensor(labels)).items()})
print(json.dumps(results))
"""
PML_SEEDS = range(3)


def _pml_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """60 unit vectors in 4 loose classes; continuous, so no tied scores."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 60)
    x = rng.normal(size=(60, 8)) + 1.5 * np.eye(4, 8)[labels]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture(scope="module")
def pml_results(tmp_path_factory) -> list[dict[str, float]]:
    """pytorch-metric-learning's figures for every case, computed in its own process: importing it
    patches faiss.Index.search for the whole process (faiss.contrib.torch_utils), which would break
    later searches that pass SearchParameters."""
    pytest.importorskip("pytorch_metric_learning")
    path = tmp_path_factory.mktemp("pml") / "cases.npz"
    cases = {f"{name}{seed}": a for seed in PML_SEEDS for name, a in zip(("x", "labels"), _pml_case(seed))}
    np.savez(path, **cases)
    out = subprocess.run([sys.executable, "-c", _PML_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the oracle's process imports torch
@pytest.mark.parametrize("seed", PML_SEEDS)
def test_per_query_metrics_match_pytorch_metric_learning(seed, pml_results):
    """Leave-one-out: AP, MAP@R, P@1 and RR averaged over queries agree with pytorch-metric-learning's
    AccuracyCalculator, an independent implementation."""
    x, labels = _pml_case(seed)
    n, got = len(x), pml_results[seed]
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    ours: dict[str, list[float]] = {"ap": [], "map@r": [], "p@1": [], "rr": []}
    for q in range(n):
        g = np.delete(np.arange(n), q)
        scores, rel = sims[q, g], labels[g] == labels[q]
        ranked = pessimistic_order(scores, rel)
        ours["ap"].append(average_precision(scores, rel))
        ours["map@r"].append(map_at_r(ranked))
        ours["p@1"].append(precision_at_k(ranked, 1))
        ours["rr"].append(reciprocal_rank(ranked))
    assert np.mean(ours["ap"]) == pytest.approx(got["mean_average_precision"], abs=1e-6)
    assert np.mean(ours["map@r"]) == pytest.approx(got["mean_average_precision_at_r"], abs=1e-6)
    assert np.mean(ours["p@1"]) == pytest.approx(got["precision_at_1"], abs=1e-6)
    assert np.mean(ours["rr"]) == pytest.approx(got["mean_reciprocal_rank"], abs=1e-6)
