"""Evaluation report: markdown summary, precision-recall curve PNG, 2-D embedding map PNG."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from indexer.atomic import atomic_path

MAX_MAP_POINTS = 5000  # t-SNE beyond this is slow on a CPU; a seeded sample is drawn


def _plt() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curve(result: dict[str, Any], path: Path, title: str = "") -> Path:
    plt = _plt()
    pr = result["pr_curve"]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    for label, prec in sorted(pr["per_class"].items()):
        ax.plot(pr["recall"], prec, lw=1.2, alpha=0.8, label=f"{label} (MAP {result['per_class'][label]['map']:.3f})")
    ax.plot(
        pr["recall"], pr["precision"], color="black", lw=2.4, label=f"all queries (MAP {result['overall']['map']:.3f})"
    )
    ax.set(
        xlabel="recall",
        ylabel="interpolated precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=title or "Precision-recall, mean over queries",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def embedding_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA to 50 dimensions, then t-SNE to 2 (paper 003)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = vectors.astype(np.float32)
    n_comp = min(50, x.shape[0], x.shape[1])
    if n_comp >= 2:
        x = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_embedding_map(rows: pd.DataFrame, vectors: np.ndarray, path: Path, title: str = "", seed: int = 0) -> Path:
    plt = _plt()
    idx = np.arange(len(rows))
    if len(idx) > MAX_MAP_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), MAX_MAP_POINTS, replace=False))
    xy = embedding_2d(vectors[idx], seed)
    labels = rows["label"].astype("string").fillna("(unlabelled)").to_numpy()[idx]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    cmap = plt.get_cmap("tab10" if len(set(labels)) <= 10 else "tab20")
    for j, lab in enumerate(sorted(set(labels))):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.75, color=cmap(j % cmap.N), label=f"{lab} ({sel.sum()})")
    ax.set(title=title or "Embedding map (PCA 50 -> t-SNE)", xticks=[], yticks=[])
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def markdown_summary(result: dict[str, Any], title: str, encoder: str) -> str:
    o, s = result["overall"], result["settings"]
    lines = [
        f"# {title}",
        "",
        f"Encoder: `{encoder}`. Images: {result['n_images']} ({result['n_labelled']} labelled). "
        f"Excluded from each query's gallery: itself"
        + (", same patient_id" if s["exclude_same_patient"] else "")
        + (", same near_dup_group" if s["exclude_near_dup"] else "")
        + f". kNN vote: k = {s['k']}, {s['vote']}.",
        "",
        "| scope | queries | MAP | MRR | P@1 | P@5 | P@10 | MAP@R | kNN acc | kNN F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| all | {o['n_queries']} | {o['map']:.4f} | {o['mrr']:.4f} | {o['p@1']:.4f} | {o['p@5']:.4f} | "
        f"{o['p@10']:.4f} | {o['map@r']:.4f} | {o['knn_accuracy']:.4f} | {o['knn_macro_f1']:.4f} (macro) |",
    ]
    for label, c in result["per_class"].items():
        if c.get("n_queries", 0) == 0:
            lines.append(f"| {label} | 0 | - | - | - | - | - | - | - | {c['knn_f1']:.4f} |")
            continue
        lines.append(
            f"| {label} | {c['n_queries']} | {c['map']:.4f} | {c['mrr']:.4f} | {c['p@1']:.4f} | {c['p@5']:.4f} | "
            f"{c['p@10']:.4f} | {c['map@r']:.4f} | recall {c['knn_recall']:.4f} | {c['knn_f1']:.4f} |"
        )
    lines += [
        "",
        f"kNN balanced accuracy: {o['knn_balanced_accuracy']:.4f}. "
        "Queries with no relevant image left in their gallery (left out of MAP/MRR): "
        f"{result['queries_without_relevant']}; "
        f"with an empty gallery: {result['queries_with_empty_gallery']}.",
        "",
        "![precision-recall](pr_curve.png)",
        "",
        "![embedding map](embedding_map.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    result: dict[str, Any], rows: pd.DataFrame, vectors: np.ndarray, out_dir: Path, title: str, encoder: str
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out_dir / "summary.md",
        "pr_curve": plot_pr_curve(result, out_dir / "pr_curve.png", f"{title}: precision-recall"),
        "embedding_map": plot_embedding_map(rows, vectors, out_dir / "embedding_map.png", f"{title}: PCA 50 -> t-SNE"),
    }
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(markdown_summary(result, title, encoder))
    return paths
