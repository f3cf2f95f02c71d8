"""Cluster assignments from a clustering checkpoint, and how well clusters agree with labels.

Matching follows paper 004's Algorithm 1: average the one-hot labels of the dev-set images assigned to
each cluster; a cluster predicts its dominant label. NMI and ARI come from scikit-learn and the
Hungarian (one-to-one) accuracy from scipy's linear_sum_assignment."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score

from retrieval.encoders.cluster_head import ClusterHeadWeights, load_cluster_head

__all__ = ["ClusterHeadWeights", "load_cluster_head", "match_clusters", "hungarian_accuracy", "cluster_scores"]


def match_clusters(assign: np.ndarray, labels: np.ndarray, classes: list[str], clusters: int) -> dict[int, str]:
    """Algorithm 1 of paper 004: each cluster's mean one-hot label vector over the dev set; the cluster maps
    to its largest entry. Clusters with no dev image map to the dev set's most common label."""
    onehot = (labels[:, None] == np.asarray(classes)[None, :]).astype(float)
    fallback = classes[int(onehot.sum(0).argmax())]
    out = {}
    for k in range(clusters):
        members = assign == k
        out[k] = classes[int(onehot[members].mean(0).argmax())] if members.any() else fallback
    return out


def hungarian_accuracy(assign: np.ndarray, labels: np.ndarray) -> float:
    """Best one-to-one map of clusters to labels (scipy's linear_sum_assignment), as accuracy."""
    clusters, codes = np.unique(assign, return_inverse=True)
    classes, ycodes = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)))
    np.add.at(counts, (codes, ycodes), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def cluster_scores(assign: np.ndarray, labels: np.ndarray, mapping: dict[int, str] | None = None) -> dict:
    """NMI, ARI and Hungarian accuracy of `assign` against `labels`; with a cluster -> label `mapping`
    (from a dev set), also weighted and per-class F1 of the mapped predictions."""
    labels = np.asarray(labels).astype(str)
    out: dict = {
        "nmi": float(normalized_mutual_info_score(labels, assign)),
        "ari": float(adjusted_rand_score(labels, assign)),
        "hungarian_accuracy": hungarian_accuracy(assign, labels),
    }
    if mapping is not None:
        pred = np.array([mapping[int(k)] for k in assign])
        classes = sorted(set(labels))
        out["weighted_f1"] = float(f1_score(labels, pred, labels=classes, average="weighted", zero_division=0))
        per = f1_score(labels, pred, labels=classes, average=None, zero_division=0)
        out["per_class_f1"] = {c: float(f) for c, f in zip(classes, per)}
    return out


CLUSTER_KEYS = ("nmi", "ari", "hungarian_accuracy", "weighted_f1")


def fold_cluster_scores(assign: np.ndarray, labels: np.ndarray, tr: np.ndarray, te: np.ndarray) -> dict:
    """Scores of one benchmark fold: clusters matched to labels on the training folds (the labelled dev
    set of Algorithm 1; training itself read no labels), everything scored on the held-out fold."""
    labels = np.asarray(labels).astype(str)
    clusters = int(assign.max()) + 1
    mapping = match_clusters(assign[tr], labels[tr], sorted(set(labels)), clusters)
    out = cluster_scores(assign[te], labels[te], mapping)
    out["clusters_used"] = int(len(np.unique(assign[te])))
    return out


def kmeans_assign(vectors: np.ndarray, tr: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """scikit-learn KMeans (10 restarts) fitted on the training rows, then every row's nearest centre."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(vectors[tr])
    return km.predict(vectors)


def summarise_clusters(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over folds of each clustering score."""
    return {
        key: {"mean": float(np.mean([r[key] for r in runs])), "std": float(np.std([r[key] for r in runs]))}
        for key in CLUSTER_KEYS
    }
