"""Per-query retrieval metrics over one ranked gallery.

Conventions (stated in the README):
- AP follows scikit-learn's `average_precision_score`: tied scores form one threshold, so AP does
  not depend on how ties are ordered. Its denominator is the number of relevant gallery items.
- Rank metrics (reciprocal rank, P@k, MAP@R) break ties against the engine: among equal scores,
  irrelevant items rank first. They never flatter.
- A query with no relevant item in its gallery has no AP/RR; callers leave it out and count it.
"""

from __future__ import annotations

import numpy as np

PR_RECALL_LEVELS = np.linspace(0.0, 1.0, 101)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Area under the step precision-recall curve, tie handling as scikit-learn."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    n_rel = int(relevant.sum())
    if n_rel == 0:
        raise ValueError("average precision is undefined without a relevant item")
    order = np.argsort(-scores, kind="stable")
    s, r = scores[order], relevant[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last position of each tied group
    cum_rel = np.cumsum(r)[ends]
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
    """Share of relevant items in the first k (k capped at the gallery size)."""
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


def interpolated_pr(scores: np.ndarray, relevant: np.ndarray, levels: np.ndarray = PR_RECALL_LEVELS) -> np.ndarray:
    """Interpolated precision (max precision at recall >= level) at each recall level."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    r = np.asarray(relevant, dtype=bool)[order]
    n_rel = r.sum()
    cum = np.cumsum(r)
    precision = cum / np.arange(1, len(r) + 1)
    recall = cum / n_rel
    best = np.maximum.accumulate(precision[::-1])[::-1]  # max precision from each rank onward
    idx = np.searchsorted(recall, levels, side="left")
    out = np.zeros(len(levels))
    valid = idx < len(r)
    out[valid] = best[idx[valid]]
    return out
