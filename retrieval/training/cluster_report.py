"""`retrieve clusters`: cluster an index's (or a dataset's) vectors with a clustering checkpoint or k-means,
match clusters to the labels of a small dev set (paper 004, Algorithm 1), score them where labels exist,
and draw a contact sheet per cluster for a person to look at."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.errors import RetrieveError
from retrieval.training.cluster_eval import cluster_scores, load_cluster_head, match_clusters

log = logging.getLogger(__name__)


@dataclass
class Clustering:
    rows: pd.DataFrame  # the clustered images, with columns cluster and cluster_probability
    clusters: int
    method: str  # "checkpoint <path> (cluster head)" or "k-means"
    scores: dict[str, Any] = field(default_factory=dict)  # NMI, ARI, Hungarian accuracy; F1 with a dev set
    mapping: dict[int, str] | None = None  # cluster -> label, from the dev set
    dev_scores: dict[str, Any] | None = None  # the dev set's own clusters against its labels (in-sample)

    def sizes(self) -> dict[int, int]:
        counts = self.rows["cluster"].value_counts()
        return {k: int(counts.get(k, 0)) for k in range(self.clusters)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "clusters": self.clusters,
            "images": len(self.rows),
            "sizes": self.sizes(),
            "scores": self.scores,
            "mapping": self.mapping,
            "dev_scores": self.dev_scores,
        }


def _labels(rows: pd.DataFrame) -> np.ndarray | None:
    """Label strings of the labelled rows' positions, or None when no row has a label."""
    if "label" not in rows:
        return None
    lab = rows["label"].astype("string")
    return None if lab.isna().all() else lab.to_numpy(dtype=object)


def assign_with_checkpoint(
    vectors: np.ndarray, checkpoint: str, head: str = "cluster"
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, probability of that cluster) per vector from the checkpoint's softmax cluster head."""
    prob = load_cluster_head(checkpoint, head).probabilities(vectors)
    return prob.argmax(1), prob.max(1)


def assign_with_kmeans(vectors: np.ndarray, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn KMeans; the 'probability' column is a softmax over negative squared distances."""
    from sklearn.cluster import KMeans

    check_cluster_count(clusters, len(vectors))
    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(vectors)
    d = km.transform(vectors) ** 2
    p = np.exp(-(d - d.min(1, keepdims=True)))
    p /= p.sum(1, keepdims=True)
    return km.labels_, p.max(1)


def check_cluster_count(clusters: int, images: int) -> None:
    if clusters < 2:
        raise RetrieveError(f"--clusters {clusters}: at least 2 clusters are needed")
    if clusters > images:
        raise RetrieveError(f"--clusters {clusters}: more clusters than images ({images})")


def score_clusters(
    rows: pd.DataFrame,
    assign: np.ndarray,
    prob: np.ndarray,
    clusters: int,
    method: str,
    dev: tuple[np.ndarray, np.ndarray] | None = None,
) -> Clustering:
    """Scores against the rows' own labels where some exist (NMI, ARI, Hungarian accuracy); with a dev set
    (its clusters and labels), the Algorithm 1 mapping and per-class and weighted F1 of the mapped clusters."""
    rows = rows.reset_index(drop=True).assign(cluster=assign, cluster_probability=np.round(prob, 4))
    out = Clustering(rows, clusters, method)
    labels = _labels(rows)
    if dev is not None:
        dev_assign, dev_labels = dev
        dev_labels = np.asarray(dev_labels).astype(str)
        if labels is not None:
            known = {str(v) for v in labels if not pd.isna(v)}
            unknown = sorted(set(dev_labels) - known)
            if unknown:
                raise RetrieveError(
                    f"--dev: label(s) {', '.join(unknown)} do not occur in the clustered images "
                    f"(they have {', '.join(sorted(known))})"
                )
        out.mapping = match_clusters(dev_assign, dev_labels, sorted(set(dev_labels)), clusters)
        out.dev_scores = cluster_scores(dev_assign, dev_labels, out.mapping)
    if labels is not None:
        has = ~pd.isna(labels)
        out.scores = cluster_scores(assign[has], labels[has].astype(str), out.mapping)
        out.scores["labelled_images"] = int(has.sum())
    return out


def contact_sheets(result: Clustering, out_dir: Path, per_cluster: int = 25, thumb: int = 96) -> list[Path]:
    """One PNG per cluster: its most confident images in a grid (a person judges what the cluster holds)."""
    from PIL import Image

    from indexer.atomic import atomic_path
    from retrieval.config import PreprocessConfig
    from retrieval.data.dataset import FrameDataset

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(result.clusters):
        members = result.rows[result.rows["cluster"] == k].sort_values("cluster_probability", ascending=False)
        members = members.head(per_cluster).reset_index(drop=True)
        ds = FrameDataset(members, PreprocessConfig(image_size=thumb))
        side = max(1, int(np.ceil(np.sqrt(max(len(members), 1)))))
        sheet = Image.new("L", (side * (thumb + 2), side * (thumb + 2)), 0)
        for i in range(len(ds)):
            t, _, _err = ds[i]
            if t is None:
                continue
            tile = Image.fromarray((t[0].numpy() * 255).round().astype(np.uint8))
            sheet.paste(tile, ((i % side) * (thumb + 2), (i // side) * (thumb + 2)))
        path = out_dir / f"cluster_{k:02d}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        paths.append(path)
    log.info("contact sheets -> %s", out_dir)
    return paths


def summary_lines(result: Clustering) -> list[str]:
    """What the CLI prints: sizes (with the mapped label), then the scores."""
    lines = [f"{result.clusters} clusters over {len(result.rows)} images ({result.method})"]
    for k, n in result.sizes().items():
        mapped = f" -> {result.mapping[k]}" if result.mapping else ""
        lines.append(f"  cluster {k:>2}: {n:>6} images{mapped}")
    if result.scores:
        s = result.scores
        lines.append(
            f"against the images' labels ({s['labelled_images']}): NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}  "
            f"Hungarian accuracy {s['hungarian_accuracy']:.3f}"
            + (f"  weighted F1 {s['weighted_f1']:.3f}" if "weighted_f1" in s else "")
        )
        if "per_class_f1" in s:
            lines.append("  F1 per class: " + ", ".join(f"{c} {f:.3f}" for c, f in s["per_class_f1"].items()))
    if result.dev_scores:
        d = result.dev_scores
        lines.append(
            f"dev set (in-sample, it chose the mapping): NMI {d['nmi']:.3f}  ARI {d['ari']:.3f}  "
            f"weighted F1 {d['weighted_f1']:.3f}"
        )
    return lines
