"""Leave-one-out retrieval evaluation: every labelled image queries all the others.

Excluded from a query's gallery: itself, unlabelled images, and by default every image with the same
`patient_id` and every image in the same `near_dup_group`. Relevant = same label. Exact search
(blocked matrix products), whatever index kind serves queries, so the figures measure the encoder.

Multi-label (`EvalSettings.multilabel`: "on", or "auto" and some label contains `|`): a label such as
`liver|kidney` is a set of classes. A gallery image is relevant to a query when the two sets share at least
one class; MAP, MRR, P@k and MAP@R use that relevance, and the stricter exact-set relevance (same set) is
reported beside them (`exact_set`). The kNN vote is `retrieval.vote.multilabel_vote` (classes named by at
least half of the vote); it is scored per class (precision, recall, F1), by micro and macro F1 and by the
share of queries whose voted set is exactly their own (`knn_exact_match`), not by balanced accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
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
from retrieval.labels import check_multilabel_mode, is_multilabel, label_matrix, set_text
from retrieval.vote import knn_vote, multilabel_vote

PRECISION_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalSettings:
    k: int = 10  # neighbours in the kNN vote
    exclude_same_patient: bool = True
    exclude_near_dup: bool = True
    vote: str = "majority"
    multilabel: str = "off"  # auto (labels with '|' are class sets), on, off (every label one class); CLI: auto


def _group_codes(rows: pd.DataFrame, column: str) -> np.ndarray:
    """Integer code per row, -1 where the column is missing or empty (no grouping)."""
    if column not in rows.columns:
        return np.full(len(rows), -1)
    text = rows[column].astype("string").fillna("").str.strip()
    codes, _ = pd.factorize(text.where(text != "", None), use_na_sentinel=True)
    return codes


NO_VOTE = "(no vote)"
RELEVANCE_MULTILABEL = "the query's and the image's class sets share at least one class"


def _galleries(
    x: np.ndarray,
    queries: np.ndarray,
    candidates: np.ndarray,
    patient: np.ndarray,
    near_dup: np.ndarray,
    block: int,
    bar: Any,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(query row, its gallery's row numbers, its similarity to every row), a block of queries at a time."""
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
            yield int(q), np.flatnonzero(gallery), sims[row]
        bar.update(len(qs))


def _rank_metrics(scores: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    ranked = pessimistic_order(scores, relevant)
    return {
        "ap": average_precision(scores, relevant),
        "rr": reciprocal_rank(ranked),
        **{f"p@{k}": precision_at_k(ranked, k) for k in PRECISION_KS},
        "map@r": map_at_r(ranked),
    }


def _summary(frame: pd.DataFrame) -> dict[str, float]:
    return {
        "n_queries": int(len(frame)),
        "map": float(frame["ap"].mean()),
        "mrr": float(frame["rr"].mean()),
        **{f"p@{k}": float(frame[f"p@{k}"].mean()) for k in PRECISION_KS},
        "map@r": float(frame["map@r"].mean()),
    }


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
    check_multilabel_mode(settings.multilabel)
    patient = _group_codes(rows, "patient_id") if settings.exclude_same_patient else np.full(len(rows), -1)
    near_dup = _group_codes(rows, "near_dup_group") if settings.exclude_near_dup else np.full(len(rows), -1)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.flatnonzero(labelled & (query_mask if query_mask is not None else True))
    candidates = labelled & (gallery_mask if gallery_mask is not None else True)
    bar = tqdm(total=len(queries), desc="evaluating", unit="query", disable=not progress, leave=False)
    galleries = _galleries(x, queries, candidates, patient, near_dup, block, bar)
    if settings.multilabel == "on" or (settings.multilabel == "auto" and is_multilabel(labels_text[labelled])):
        try:
            result = _evaluate_multilabel(rows, labels_text, labelled, galleries, settings)
        finally:
            bar.close()
        return result if keep_per_query else {k: v for k, v in result.items() if k != "per_query"}
    label_codes, classes = pd.factorize(labels_text.where(labelled, None), use_na_sentinel=True)
    classes = [str(c) for c in classes]

    per_query: list[dict[str, Any]] = []
    pr_curves = []
    chance = []  # each scored query's share of relevant images in its gallery: a random ranking's precision
    no_relevant = 0
    empty_gallery = 0
    y_true, y_pred = [], []
    for q, g, sims in galleries:
        if g.size == 0:
            empty_gallery += 1
            continue
        scores = sims[g]
        relevant = label_codes[g] == label_codes[q]
        # vote: nearest k by score only (stable on gallery order), labels never peeked at
        top = g[np.argsort(-scores, kind="stable")[: settings.k]]
        vote = knn_vote([classes[c] for c in label_codes[top]], sims[top], settings.vote)
        y_true.append(classes[label_codes[q]])
        y_pred.append(vote.label)
        if not relevant.any():
            no_relevant += 1
            continue
        per_query.append({"row": q, "label": classes[label_codes[q]], **_rank_metrics(scores, relevant)})
        pr_curves.append(interpolated_pr(scores, relevant))
        chance.append(float(relevant.mean()))
    bar.close()
    if not per_query:
        raise RetrieveError("evaluation impossible: no query has a relevant image left in its gallery")

    pq = pd.DataFrame(per_query)
    overall = _summary(pq)
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
    per_class = {
        c: _class_entry(pq[pq["label"] == c], prec[j], rec[j], f1[j], support[j]) for j, c in enumerate(classes)
    }
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
        "pr_curve": _pr_curve(curves, by_class_curve, chance),
        "vote_confusion": vote_confusion(y_true, y_pred),
    }
    if keep_per_query:
        result["per_query"] = pq.to_dict("records")
    return result


def _evaluate_multilabel(
    rows: pd.DataFrame,
    labels_text: pd.Series,
    labelled: np.ndarray,
    galleries: Iterator[tuple[int, np.ndarray, np.ndarray]],
    settings: EvalSettings,
) -> dict[str, Any]:
    """The multi-label evaluation (module docstring): overlap relevance, exact-set relevance beside it, the
    per-class vote. Same result layout as the single-label one, without `vote_confusion` and balanced
    accuracy, with `exact_set` and `multilabel`."""
    at = np.flatnonzero(labelled)
    ids = rows["id"].astype(str).to_numpy() if "id" in rows else at.astype(str)
    where = [f" (image id {ids[i]})" if "id" in rows else f" (image row {i})" for i in at]
    classes, matrix = label_matrix([str(x) for x in labels_text.to_numpy()[at]], where)
    sets = np.zeros((len(rows), len(classes)), dtype=bool)
    sets[at] = matrix
    per_query: list[dict[str, Any]] = []
    exact_rows: list[dict[str, Any]] = []
    pr_curves, chance = [], []
    no_relevant = no_exact = empty_gallery = 0
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    names = np.array(classes, dtype=object)
    for q, g, sims in galleries:
        if g.size == 0:
            empty_gallery += 1
            continue
        scores = sims[g]
        relevant = (sets[g] & sets[q]).any(axis=1)
        exact = (sets[g] == sets[q]).all(axis=1)
        top = g[np.argsort(-scores, kind="stable")[: settings.k]]
        vote = multilabel_vote([list(names[sets[t]]) for t in top], sims[top], settings.vote)
        y_true.append(sets[q])
        y_pred.append(np.isin(names, vote.labels or []))
        if not relevant.any():
            no_relevant += 1
            continue
        label = set_text(names[sets[q]])
        per_query.append({"row": q, "label": label, **_rank_metrics(scores, relevant)})
        pr_curves.append(interpolated_pr(scores, relevant))
        chance.append(float(relevant.mean()))
        if exact.any():
            exact_rows.append({"row": q, "label": label, **_rank_metrics(scores, exact)})
        else:
            no_exact += 1
    if not per_query:
        raise RetrieveError("evaluation impossible: no query has a relevant image left in its gallery")
    pq = pd.DataFrame(per_query)
    truth, pred = np.vstack(y_true), np.vstack(y_pred)
    prec, rec, f1, support = precision_recall_fscore_support(truth, pred, zero_division=0)
    overall: dict[str, Any] = _summary(pq)
    overall.update(
        {
            "knn_micro_f1": float(f1_score(truth, pred, average="micro", zero_division=0)),
            "knn_macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
            "knn_exact_match": float((truth == pred).all(axis=1).mean()),
            "n_vote_queries": len(truth),
        }
    )
    query_sets = sets[pq["row"].to_numpy()]
    curves = np.vstack(pr_curves)
    per_class: dict[str, dict[str, float]] = {}
    by_class_curve = {}
    for j, c in enumerate(classes):
        has = query_sets[:, j]
        per_class[c] = _class_entry(pq[has], prec[j], rec[j], f1[j], support[j])
        if has.any():
            by_class_curve[c] = curves[has].mean(axis=0).round(5).tolist()
    exact_frame = pd.DataFrame(exact_rows)
    return {
        "settings": asdict(settings),
        "multilabel": {
            "relevance": RELEVANCE_MULTILABEL,
            "vote_rule": "classes named by at least half of the k neighbours' vote weight",
            "label_sets": {set_text(names[r]): int(n) for r, n in zip(*_set_counts(matrix))},
        },
        "n_images": int(len(rows)),
        "n_labelled": int(labelled.sum()),
        "classes": classes,
        "overall": overall,
        "exact_set": {
            "relevance": "the same class set",
            **(_summary(exact_frame) if len(exact_frame) else {"n_queries": 0}),
            "queries_without_exact_match": no_exact,
        },
        "per_class": per_class,
        "queries_without_relevant": no_relevant,
        "queries_with_empty_gallery": empty_gallery,
        "pr_curve": _pr_curve(curves, by_class_curve, chance),
        "per_query": pq.to_dict("records"),
    }


def _pr_curve(curves: np.ndarray, by_class: dict[str, list[float]], chance: list[float]) -> dict[str, Any]:
    """The result's mean interpolated PR curve (queries' curves as rows), its per-class means and chance."""
    return {
        "recall": PR_RECALL_LEVELS.round(3).tolist(),
        "precision": curves.mean(axis=0).round(5).tolist(),
        "per_class": by_class,
        "chance_precision": round(float(np.mean(chance)), 5),
    }


def _class_entry(sub: pd.DataFrame, precision: float, recall: float, f1: float, support: int) -> dict[str, float]:
    """A class's per_class entry: the summary of its queries' rows `sub` (or n_queries 0) and its vote scores."""
    entry: dict[str, float] = _summary(sub) if len(sub) else {"n_queries": 0}
    entry.update(
        {"knn_precision": float(precision), "knn_recall": float(recall), "knn_f1": float(f1), "n_images": int(support)}
    )
    return entry


def _set_counts(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a boolean matrix (sorted) and how many times each occurs."""
    uniq, counts = np.unique(matrix, axis=0, return_counts=True)
    return uniq.astype(bool), counts
