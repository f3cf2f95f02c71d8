"""Folds of the benchmark: groups (patient and near-duplicate group) that never straddle a split, grouped
stratified k-fold, the inner selection split of the training folds, and the few-labels setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from retrieval.errors import RetrieveError


def group_ids(rows: pd.DataFrame) -> np.ndarray:
    """Union of patient_id and near_dup_group links (union-find); ungrouped images stand alone."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for col in ("patient_id", "near_dup_group"):
        if col not in rows:
            continue
        first: dict[str, int] = {}
        for i, v in enumerate(rows[col].astype("string").fillna("").str.strip()):
            if v:
                if v in first:
                    parent[find(i)] = find(first[v])
                else:
                    first[v] = i
    return np.array([find(i) for i in range(len(rows))])


def make_folds(rows: pd.DataFrame, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    labels = rows["label"].astype(str).to_numpy()
    groups = group_ids(rows)
    if len(np.unique(groups)) < k:
        raise RetrieveError(f"--folds {k}: only {len(np.unique(groups))} patient/near-duplicate groups")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(rows)), labels, groups)]


def inner_split(rows: pd.DataFrame, tr: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One grouped, stratified split of the training folds: about 3/4 inner-train, 1/4 validation."""
    sub = rows.iloc[tr].reset_index(drop=True)
    n_groups = len(np.unique(group_ids(sub)))
    k = 4 if n_groups >= 8 else 2
    itr, iva = make_folds(sub, k, seed + 1000)[0]
    return tr[itr], tr[iva]


def keep_label_fraction(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The rows with all labels blanked but those of a random, stratified `fraction` of the patients: the
    few-labels setting of semi-supervised methods, simulated on a labelled archive. Whole groups (patient
    and near-duplicate group, as the folds) are labelled or not; per class (a group's most frequent label),
    groups are taken in a seeded random order whenever one brings that class's labelled images closer to
    `fraction` of its images, and at least one group per class is taken."""
    rng = np.random.default_rng(seed)
    labels = rows["label"].astype(str).to_numpy()
    groups = group_ids(rows)
    by_group = pd.DataFrame({"g": groups, "y": labels}).groupby("g")["y"]
    major = by_group.agg(lambda y: y.value_counts().sort_index().idxmax())  # ties: the first label by name
    sizes = by_group.size()
    chosen: list[int] = []
    for cls in sorted(set(labels)):
        target, taken = fraction * float((labels == cls).sum()), 0
        for g in rng.permutation(major.index[major == cls].to_numpy()):
            if not taken or abs(taken + sizes[g] - target) < abs(taken - target):
                chosen.append(g)
                taken += int(sizes[g])
    out = rows.copy()
    out["label"] = out["label"].astype("string").where(np.isin(groups, chosen), pd.NA)
    return out
