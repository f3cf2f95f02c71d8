import pytest

from retrieval.errors import RetrieveError
from retrieval.vote import knn_vote


def test_majority():
    v = knn_vote(["a", "b", "a"], [0.9, 0.8, 0.1])
    assert v.label == "a" and v.confidence == pytest.approx(2 / 3) and v.votes == {"a": 2.0, "b": 1.0}


def test_similarity_weighting_changes_winner():
    labels, scores = ["b", "a", "a"], [0.99, -0.9, -0.9]
    assert knn_vote(labels, scores, "majority").label == "a"
    v = knn_vote(labels, scores, "similarity")
    assert v.label == "b"
    assert v.votes["b"] == pytest.approx(0.995) and v.votes["a"] == pytest.approx(0.1)


def test_tie_goes_to_nearest_label_and_unlabelled_do_not_vote():
    assert knn_vote(["b", "a", None, "a", "b"], [0.9, 0.8, 0.7, 0.6, 0.5]).label == "b"
    assert knn_vote([None, None], [0.9, 0.8]).label is None


def test_unknown_weighting():
    with pytest.raises(RetrieveError):
        knn_vote(["a"], [1.0], "median")
