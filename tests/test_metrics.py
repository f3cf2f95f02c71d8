"""Metrics against scikit-learn and against small cases worked by hand."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from retrieval.evaluation.metrics import (
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
