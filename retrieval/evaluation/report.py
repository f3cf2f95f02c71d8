"""Evaluation report: markdown summary, precision-recall curve PNG (with its chance line), kNN-vote
confusion matrix PNG, 2-D embedding map PNG; and the label palette every chart (report and browser) uses."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from indexer.atomic import atomic_path

MAX_MAP_POINTS = 5000  # t-SNE beyond this is slow on a CPU; a seeded sample is drawn

# One fixed categorical palette (Tableau 10 without its grey, then three dark hues): label i of the
# sorted labels gets colour i, so a label has the same colour in every chart of one index. Beyond
# len(LABEL_PALETTE) labels the colours repeat. Grey is kept for images without a label.
LABEL_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#e7ba52",
    "#7b4173",
)
UNLABELLED = "(unlabelled)"
UNLABELLED_COLOUR = "#9e9e9e"


def label_colours(labels: Iterable[object]) -> dict[str, str]:
    """Each distinct label (as text) -> its colour: the labels sorted, coloured in palette order;
    '(unlabelled)' is grey. The same set of labels always gets the same colours, in any order given."""
    names = sorted({str(lab) for lab in labels} - {UNLABELLED})
    out = {lab: LABEL_PALETTE[j % len(LABEL_PALETTE)] for j, lab in enumerate(names)}
    if UNLABELLED in {str(lab) for lab in labels}:
        out[UNLABELLED] = UNLABELLED_COLOUR
    return out


def _plt() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curve(result: dict[str, Any], path: Path, title: str = "") -> Path:
    plt = _plt()
    pr = result["pr_curve"]
    colours = label_colours(result["per_class"])
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    for label, prec in sorted(pr["per_class"].items()):
        ax.plot(
            pr["recall"],
            prec,
            lw=1.2,
            alpha=0.8,
            color=colours[label],
            label=f"{label} (MAP {result['per_class'][label]['map']:.3f})",
        )
    ax.plot(
        pr["recall"], pr["precision"], color="black", lw=2.4, label=f"all queries (MAP {result['overall']['map']:.3f})"
    )
    chance = pr.get("chance_precision")
    if chance is not None:
        ax.axhline(
            chance,
            color="black",
            lw=1.2,
            ls="--",
            label=f"chance {chance:.3f} (random ranking: mean share of\nrelevant images in each query's gallery)",
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
    labels = rows["label"].astype("string").fillna(UNLABELLED).to_numpy()[idx]
    colours = label_colours(labels)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    for lab in sorted(set(labels)):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.75, color=colours[lab], label=f"{lab} ({sel.sum()})")
    ax.set(title=title or "Embedding map (PCA 50 -> t-SNE)", xticks=[], yticks=[])
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def confusion_tables(result: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The kNN vote's confusion matrix as counts and as row-normalised shares (each true label's row
    sums to 1): rows = true label, columns = voted label."""
    conf = result["vote_confusion"]
    counts = pd.DataFrame(conf["counts"], index=conf["labels"], columns=conf["columns"])
    counts.index.name, counts.columns.name = "true label", "voted label"
    totals = counts.sum(axis=1).replace(0, 1)
    return counts, counts.div(totals, axis=0)


def plot_confusion(result: dict[str, Any], path: Path, title: str = "") -> Path:
    """Heat map of the row-normalised shares, each cell annotated with its count and share."""
    plt = _plt()
    counts, shares = confusion_tables(result)
    n_rows, n_cols = counts.shape
    side = max(4.0, 0.9 * max(n_rows, n_cols) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 0.8, side), dpi=110)
    im = ax.imshow(shares.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n_rows):
        for j in range(n_cols):
            share = float(shares.iat[i, j])
            ax.text(
                j,
                i,
                f"{int(counts.iat[i, j])}\n{share:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share > 0.6 else "black",
            )
    ax.set_xticks(range(n_cols), [str(c) for c in counts.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in counts.index])
    s = result.get("settings", {})
    ax.set(
        xlabel="voted label (kNN vote)",
        ylabel="true label",
        title=title or f"kNN vote (k = {s.get('k', '?')}, {s.get('vote', '?')}): counts and row shares",
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's queries")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def confusion_markdown(result: dict[str, Any]) -> list[str]:
    counts, shares = confusion_tables(result)
    lines = [
        "kNN vote confusion (rows = true label, columns = voted label; count and share of the row):",
        "",
        "| true label | " + " | ".join(str(c) for c in counts.columns) + " |",
        "|---" * (len(counts.columns) + 1) + "|",
    ]
    for lab in counts.index:
        cells = [f"{int(counts.at[lab, c])} ({shares.at[lab, c]:.0%})" for c in counts.columns]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def _head(result: dict[str, Any], title: str, encoder: str, kind: str = "", vote_rule: str = "") -> list[str]:
    """The summary's title and its paragraph on the data, the gallery exclusions and the vote."""
    s = result["settings"]
    return [
        f"# {title}",
        "",
        f"Encoder: `{encoder}`. Images: {result['n_images']} ({result['n_labelled']} labelled). {kind}"
        "Excluded from each query's gallery: itself"
        + (", same patient_id" if s["exclude_same_patient"] else "")
        + (", same near_dup_group" if s["exclude_near_dup"] else "")
        + f". kNN vote: k = {s['k']}, {s['vote']}{vote_rule}.",
        "",
    ]


def _row(scope: str, c: dict[str, Any], knn: str) -> str:
    """A table row: the scope, its retrieval metrics ('-' where it has no query) and its kNN cells `knn`."""
    if c.get("n_queries", 0) == 0:
        return f"| {scope} | 0 | - | - | - | - | - | - | {knn} |"
    return (
        f"| {scope} | {c['n_queries']} | {c['map']:.4f} | {c['mrr']:.4f} | {c['p@1']:.4f} | {c['p@5']:.4f} | "
        f"{c['p@10']:.4f} | {c['map@r']:.4f} | {knn} |"
    )


def _multilabel_markdown(result: dict[str, Any], title: str, encoder: str) -> list[str]:
    o, e = result["overall"], result["exact_set"]
    ml = result["multilabel"]
    lines = _head(
        result,
        title,
        encoder,
        f"Multi-label: {len(result['classes'])} classes in {len(ml['label_sets'])} label sets. Relevant: "
        f"{ml['relevance']}. ",
        f"; the voted set = {ml['vote_rule']}",
    )
    lines += [
        "| scope | queries | MAP | MRR | P@1 | P@5 | P@10 | MAP@R | kNN precision | kNN recall | kNN F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        _row("all", o, f"- | - | {o['knn_micro_f1']:.4f} (micro)"),
    ]
    for label, c in result["per_class"].items():
        lines.append(_row(label, c, f"{c['knn_precision']:.4f} | {c['knn_recall']:.4f} | {c['knn_f1']:.4f}"))
    exact = (
        f"MAP {e['map']:.4f}, MRR {e['mrr']:.4f}, P@1 {e['p@1']:.4f} over {e['n_queries']} queries"
        if e["n_queries"]
        else "no query has an image with its exact set in its gallery"
    )
    lines += [
        "",
        f"A class's row: the queries whose set names it. kNN micro-F1 {o['knn_micro_f1']:.4f}, macro-F1 "
        f"{o['knn_macro_f1']:.4f}, exact set voted {o['knn_exact_match']:.4f} of {o['n_vote_queries']} queries.",
        f"Stricter relevance (the same class set): {exact}; queries without such an image: "
        f"{e['queries_without_exact_match']}.",
        "Queries with no relevant image left in their gallery (left out of MAP/MRR): "
        f"{result['queries_without_relevant']}; with an empty gallery: {result['queries_with_empty_gallery']}.",
        "",
    ]
    return lines


def markdown_summary(result: dict[str, Any], title: str, encoder: str) -> str:
    if "multilabel" in result:
        lines = _multilabel_markdown(result, title, encoder)
        lines += ["![precision-recall](pr_curve.png)", "", "![embedding map](embedding_map.png)", ""]
        return "\n".join(lines)
    o = result["overall"]
    lines = _head(result, title, encoder)
    lines += [
        "| scope | queries | MAP | MRR | P@1 | P@5 | P@10 | MAP@R | kNN acc | kNN F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        _row("all", o, f"{o['knn_accuracy']:.4f} | {o['knn_macro_f1']:.4f} (macro)"),
    ]
    for label, c in result["per_class"].items():
        knn = f"recall {c['knn_recall']:.4f}" if c.get("n_queries", 0) else "-"
        lines.append(_row(label, c, f"{knn} | {c['knn_f1']:.4f}"))
    lines += [
        "",
        f"kNN balanced accuracy: {o['knn_balanced_accuracy']:.4f}. "
        "Queries with no relevant image left in their gallery (left out of MAP/MRR): "
        f"{result['queries_without_relevant']}; "
        f"with an empty gallery: {result['queries_with_empty_gallery']}.",
        "",
    ]
    if "vote_confusion" in result:
        lines += [*confusion_markdown(result), ""]
    lines += [
        "![precision-recall](pr_curve.png)",
        "",
        *(["![kNN vote confusion matrix](confusion.png)", ""] if "vote_confusion" in result else []),
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
    if "vote_confusion" in result:
        paths["confusion"] = plot_confusion(result, out_dir / "confusion.png")
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(markdown_summary(result, title, encoder))
    return paths
