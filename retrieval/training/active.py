"""Active learning (paper 002, M9), the model-free part: which unlabelled images of an index would help
most if a person labelled them. `entropy`: the entropy of the kNN vote among the labelled images (an
image whose neighbours disagree is one the index cannot place); `random`: the baseline to beat."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retrieval.errors import RetrieveError

STRATEGIES = ("entropy", "random")


def vote_entropy(vectors: np.ndarray, labelled: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Entropy (nats) of the majority vote of each row's k most similar labelled rows (cosine, itself
    excluded); `labelled` is a boolean mask and `labels` the labels of the rows it marks."""
    lab_idx = np.flatnonzero(labelled)
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = v @ v[lab_idx].T
    sims[lab_idx, np.arange(len(lab_idx))] = -np.inf  # a labelled row never votes for itself
    k = min(k, len(lab_idx))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    counts = np.zeros((len(v), len(classes)))
    np.add.at(counts, (np.repeat(np.arange(len(v)), k), codes[top].ravel()), 1.0)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def suggest_labels(
    rows: pd.DataFrame, vectors: np.ndarray, budget: int, strategy: str = "entropy", k: int = 10, seed: int = 0
) -> pd.DataFrame:
    """The `budget` unlabelled rows to label next, most useful first, with an empty `label` column to fill in."""
    if strategy not in STRATEGIES:
        raise RetrieveError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise RetrieveError(f"--budget {budget}: must be at least 1")
    lab = rows["label"].astype("string") if "label" in rows else pd.Series(pd.NA, index=rows.index, dtype="string")
    labelled = lab.notna().to_numpy()
    pool = np.flatnonzero(~labelled)
    if not len(pool):
        raise RetrieveError("every image of the index has a label: nothing to suggest")
    if strategy == "random":
        score = np.random.default_rng(seed).random(len(pool))
    else:
        if labelled.sum() < 2 or lab[labelled].nunique() < 2:
            raise RetrieveError("--strategy entropy needs labelled images of at least two classes in the index")
        score = vote_entropy(vectors, labelled, lab[labelled].to_numpy(dtype=str), k)[pool]
    best = np.argsort(-score, kind="stable")[:budget]
    keep = [c for c in ("id", "path", "frame_index", "patient_id") if c in rows]
    out = rows.iloc[pool[best]][keep].reset_index(drop=True)
    out["score"] = np.round(score[best], 4)
    out["label"] = ""
    return out
