"""Leave-one-out retrieval evaluation: every labelled image queries all the others.

Excluded from a query's gallery: itself, unlabelled images, and by default every image with the same
`patient_id` and every image in the same `near_dup_group`. Relevant = same label. Exact search
(blocked matrix products), whatever index kind serves queries, so the figures measure the encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support
from tqdm import tqdm

from retrieval.errors import RetrieveError
from retrieval.evaluation.metrics import (
    PR_RECALL_LEVELS,
    average_precision,
    interpolated_pr,
    map_at_r,
    pessimistic_order,
    precision_at_k,
    reciprocal_rank,
)
from retrieval.vote import knn_vote

PRECISION_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalSettings:
    k: int = 10  # neighbours in the kNN vote
    exclude_same_patient: bool = True
    exclude_near_dup: bool = True
    vote: str = "majority"


def _group_codes(rows: pd.DataFrame, column: str) -> np.ndarray:
    """Integer code per row, -1 where the column is missing or empty (no grouping)."""
    if column not in rows.columns:
        return np.full(len(rows), -1)
    text = rows[column].astype("string").fillna("").str.strip()
    codes, _ = pd.factorize(text.where(text != "", None), use_na_sentinel=True)
    return codes


NO_VOTE = "(no vote)"


def vote_confusion(y_true: list[str], y_pred: list[str | None]) -> dict[str, Any]:
    """Counts of (true label, voted label): rows = true labels, columns = voted labels, both sorted;
    a query whose neighbours cast no vote counts in a last '(no vote)' column."""
    labels = sorted(set(y_true) | {p for p in y_pred if p is not None})
    columns = labels + ([NO_VOTE] if any(p is None for p in y_pred) else [])
    at = {lab: j for j, lab in enumerate(columns)}
    counts = np.zeros((len(labels), len(columns)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        counts[at[t], at[NO_VOTE if p is None else p]] += 1
    return {"labels": labels, "columns": columns, "counts": counts.tolist()}


def evaluate(
    rows: pd.DataFrame,
    vectors: np.ndarray,
    settings: EvalSettings = EvalSettings(),
    block: int = 512,
    progress: bool = True,
    query_mask: np.ndarray | None = None,
    gallery_mask: np.ndarray | None = None,
    keep_per_query: bool = False,
) -> dict[str, Any]:
    """Leave-one-out by default; with masks, only `query_mask` rows query and only `gallery_mask` rows
    are candidates (a held-out fold against the training folds). `keep_per_query` adds each scored
    query's metrics, with its row number, as `per_query`."""
    labels_text = (
        rows["label"].astype("string") if "label" in rows else pd.Series(pd.NA, index=rows.index, dtype="string")
    )
    labelled = labels_text.notna().to_numpy() & (labels_text.fillna("") != "").to_numpy()
    if not labelled.any():
        raise RetrieveError(
            "no labels: the index holds no labelled images, so there is nothing to evaluate against "
            "(join labels with --labels CSV: a label column and a path, sop_uid or accession column)"
        )
    if labelled.sum() < 2:
        raise RetrieveError("evaluation needs labels: fewer than two labelled images in the index")
    label_codes, classes = pd.factorize(labels_text.where(labelled, None), use_na_sentinel=True)
    classes = [str(c) for c in classes]
    patient = _group_codes(rows, "patient_id") if settings.exclude_same_patient else np.full(len(rows), -1)
    near_dup = _group_codes(rows, "near_dup_group") if settings.exclude_near_dup else np.full(len(rows), -1)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.flatnonzero(labelled & (query_mask if query_mask is not None else True))
    candidates = labelled & (gallery_mask if gallery_mask is not None else True)

    per_query: list[dict[str, Any]] = []
    pr_curves = []
    chance = []  # each scored query's share of relevant images in its gallery: a random ranking's precision
    no_relevant = 0
    empty_gallery = 0
    y_true, y_pred = [], []
    bar = tqdm(total=len(queries), desc="evaluating", unit="query", disable=not progress, leave=False)
    for start in range(0, len(queries), block):
        qs = queries[start : start + block]
        sims = x[qs] @ x.T
        for row, q in enumerate(qs):
            gallery = candidates.copy()
            gallery[q] = False
            if patient[q] >= 0:
                gallery &= patient != patient[q]
            if near_dup[q] >= 0:
                gallery &= near_dup != near_dup[q]
            g = np.flatnonzero(gallery)
            if g.size == 0:
                empty_gallery += 1
                continue
            scores = sims[row, g]
            relevant = label_codes[g] == label_codes[q]
            # vote: nearest k by score only (stable on gallery order), labels never peeked at
            top = g[np.argsort(-scores, kind="stable")[: settings.k]]
            vote = knn_vote([classes[c] for c in label_codes[top]], sims[row, top], settings.vote)
            y_true.append(classes[label_codes[q]])
            y_pred.append(vote.label)
            if not relevant.any():
                no_relevant += 1
                continue
            ranked = pessimistic_order(scores, relevant)
            per_query.append(
                {
                    "row": int(q),
                    "label": classes[label_codes[q]],
                    "ap": average_precision(scores, relevant),
                    "rr": reciprocal_rank(ranked),
                    **{f"p@{k}": precision_at_k(ranked, k) for k in PRECISION_KS},
                    "map@r": map_at_r(ranked),
                }
            )
            pr_curves.append(interpolated_pr(scores, relevant))
            chance.append(float(relevant.mean()))
        bar.update(len(qs))
    bar.close()
    if not per_query:
        raise RetrieveError("evaluation impossible: no query has a relevant image left in its gallery")

    pq = pd.DataFrame(per_query)

    def summary(frame: pd.DataFrame) -> dict[str, float]:
        return {
            "n_queries": int(len(frame)),
            "map": float(frame["ap"].mean()),
            "mrr": float(frame["rr"].mean()),
            **{f"p@{k}": float(frame[f"p@{k}"].mean()) for k in PRECISION_KS},
            "map@r": float(frame["map@r"].mean()),
        }

    overall = summary(pq)
    overall.update(
        {
            "knn_accuracy": float(np.mean([t == p for t, p in zip(y_true, y_pred)])),
            "knn_balanced_accuracy": float(balanced_accuracy_score(y_true, [p or "" for p in y_pred])),
            "knn_macro_f1": float(
                f1_score(y_true, [p or "" for p in y_pred], labels=classes, average="macro", zero_division=0)
            ),
            "n_vote_queries": len(y_true),
        }
    )
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, [p or "" for p in y_pred], labels=classes, zero_division=0
    )
    per_class = {}
    for j, c in enumerate(classes):
        sub = pq[pq["label"] == c]
        entry: dict[str, float] = summary(sub) if len(sub) else {"n_queries": 0}
        entry.update(
            {
                "knn_precision": float(prec[j]),
                "knn_recall": float(rec[j]),
                "knn_f1": float(f1[j]),
                "n_images": int(support[j]),
            }
        )
        per_class[c] = entry
    curves = np.vstack(pr_curves)
    by_class_curve = {
        c: curves[(pq["label"] == c).to_numpy()].mean(axis=0).round(5).tolist()
        for c in classes
        if (pq["label"] == c).any()
    }
    result = {
        "settings": asdict(settings),
        "n_images": int(len(rows)),
        "n_labelled": int(labelled.sum()),
        "classes": classes,
        "overall": overall,
        "per_class": per_class,
        "queries_without_relevant": no_relevant,
        "queries_with_empty_gallery": empty_gallery,
        "pr_curve": {
            "recall": PR_RECALL_LEVELS.round(3).tolist(),
            "precision": curves.mean(axis=0).round(5).tolist(),
            "per_class": by_class_curve,
            "chance_precision": round(float(np.mean(chance)), 5),
        },
        "vote_confusion": vote_confusion(y_true, y_pred),
    }
    if keep_per_query:
        result["per_query"] = pq.to_dict("records")
    return result
