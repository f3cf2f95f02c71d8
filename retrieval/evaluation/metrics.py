"""Per-query retrieval metrics over one ranked gallery.

Conventions (stated in the README):
- AP follows scikit-learn's `average_precision_score`: tied scores form one threshold, so AP does
  not depend on how ties are ordered. Its denominator is the number of relevant gallery items.
- Rank metrics (reciprocal rank, P@k, MAP@R) break ties against the engine: among equal scores,
  irrelevant items rank first. They never flatter.
- P@k divides by min(k, gallery size), so a perfect ranking scores 1 even when the gallery holds
  fewer than k items (trec_eval divides by k; the two differ only for such tiny galleries).
- The interpolated precision-recall curve is taken over scikit-learn's `precision_recall_curve`
  operating points (one per distinct score, without its recall-0 end point).
- A query with no relevant item in its gallery has no AP/RR; callers leave it out and count it.
"""

from __future__ import annotations

import numpy as np

PR_RECALL_LEVELS = np.arange(101) / 100  # 0.35 here is the same float as recall 7/20
_RECALL_TOLERANCE = 1e-9  # a recall equal to a level up to float rounding reaches it


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Area under the step precision-recall curve, tie handling as scikit-learn."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    n_rel = int(relevant.sum())
    if n_rel == 0:
        raise ValueError("average precision is undefined without a relevant item")
    order = np.argsort(-scores, kind="stable")
    ends = _tie_group_ends(scores[order])
    cum_rel = np.cumsum(relevant[order])[ends]
    precision = cum_rel / (ends + 1)
    gained = np.diff(np.r_[0, cum_rel])
    return float(np.sum(gained * precision) / n_rel)


def pessimistic_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Relevance in rank order, highest score first, ties broken with irrelevant items first."""
    order = np.lexsort((np.asarray(relevant, dtype=bool), -np.asarray(scores, dtype=np.float64)))
    return np.asarray(relevant, dtype=bool)[order]


def reciprocal_rank(ranked_relevant: np.ndarray) -> float:
    hits = np.flatnonzero(ranked_relevant)
    return 0.0 if hits.size == 0 else 1.0 / (hits[0] + 1)


def precision_at_k(ranked_relevant: np.ndarray, k: int) -> float:
    """Share of relevant items in the first k, k capped at the gallery size (see the module docstring)."""
    k = min(k, len(ranked_relevant))
    return float(np.mean(ranked_relevant[:k])) if k > 0 else 0.0


def map_at_r(ranked_relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020): R = relevant count; mean of P@i over relevant ranks i <= R."""
    r = int(ranked_relevant.sum())
    if r == 0:
        return 0.0
    top = ranked_relevant[:r]
    prec = np.cumsum(top) / np.arange(1, r + 1)
    return float(np.sum(prec * top) / r)


def _tie_group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Last position of each run of equal scores in a descending score array."""
    return np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])


def interpolated_pr(scores: np.ndarray, relevant: np.ndarray, levels: np.ndarray = PR_RECALL_LEVELS) -> np.ndarray:
    """Interpolated precision at each recall level: the highest precision at any threshold whose
    recall reaches the level (0 where none does). Tied scores form one threshold, as in
    scikit-learn's `precision_recall_curve`."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    n_rel = int(relevant.sum())
    if n_rel == 0:
        raise ValueError("a precision-recall curve is undefined without a relevant item")
    order = np.argsort(-scores, kind="stable")
    ends = _tie_group_ends(scores[order])
    cum = np.cumsum(relevant[order])[ends]
    precision = cum / (ends + 1)
    recall = cum / n_rel
    best = np.maximum.accumulate(precision[::-1])[::-1]  # max precision from each threshold onward
    idx = np.searchsorted(recall, np.asarray(levels, dtype=np.float64) - _RECALL_TOLERANCE, side="left")
    out = np.zeros(len(idx))
    valid = idx < len(recall)
    out[valid] = best[idx[valid]]
    return out
