"""The benchmark's results as a summary per method (mean and spread over folds), a markdown table and
strict JSON, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.training.cluster_eval import CLUSTER_KEYS
from retrieval.training.scoring import PROBE_KEYS, RETRIEVAL_KEYS

BASELINES = ("raw-pixels", "random-resnet18", "imagenet-effnet-lite0")
CHOSEN_INPUT_PREFIX = "kmeans-chosen-input-"  # a clustering row that follows, per fold, a method's chosen input


def is_baseline(name: str) -> bool:
    """The fixed baselines, and `random-<encoder>-<size>px`: a method's random-init backbone, untouched."""
    return name in BASELINES or name.startswith("random-")


def summarise_folds(runs: list[dict[str, float]], folds: int) -> dict[str, dict[str, float | None]]:
    """Mean and standard deviation over every fold of every repeat (None where a metric never applies);
    with repeats, also the standard deviation of the repeats' means (how much the split alone moves it)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in RETRIEVAL_KEYS + PROBE_KEYS:
        vals = np.array([r[key] for r in runs], dtype=float)
        ok = vals[~np.isnan(vals)]
        entry: dict[str, float | None] = {
            "mean": float(ok.mean()) if len(ok) else None,
            "std": float(ok.std()) if len(ok) else None,
        }
        if len(vals) > folds and len(ok) == len(vals):
            entry["repeat_std"] = float(vals.reshape(-1, folds).mean(1).std())
        out[key] = entry
    return out


def _cell(stat: dict[str, float | None]) -> str:
    return "-" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _json_safe(obj: Any) -> Any:
    """NaN (a metric that does not apply to a fold) becomes null, so the file is strict JSON."""
    if isinstance(obj, float) and np.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def cluster_table(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the clustering scores on held-out folds (none when no clustering method ran)."""
    summary = result.get("clustering", {}).get("summary", {})
    if not summary:
        return []
    lines = [
        "",
        "Clusters on the held-out folds (K = classes; clusters matched to labels on the training folds):",
        "",
        "| clustering | NMI | ARI | Hungarian acc | weighted F1 |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(_cell(s[k]) for k in CLUSTER_KEYS) + " |")
    own = result["clustering"].get("own_input_kmeans", {})
    if own:
        lines += [
            "",
            "k-means (same K) on each clustering method's own input features (z-scored: the training folds' "
            "mean/std): " + "; ".join(f"{m}: {', '.join(names)}" for m, names in own.items()) + ".",
        ]
    chosen_inputs = result["clustering"].get("chosen_input_kmeans", {})
    if chosen_inputs:
        lines += ["", *(head_to_head(result, m, names) for m, names in chosen_inputs.items())]
    return lines


def head_to_head(result: dict[str, Any], method: str, inputs: list[str | None]) -> str:
    """One line: a clustering method against k-means on the input each fold trained on (`inputs`, one k-means
    row per fold, following the inner split's choice), means and the number of folds the method is higher. A
    fold whose choice trained its backbone end to end has no fixed input (None) and is left out on both sides."""
    per_fold = result["clustering"]["per_fold"]
    if len(inputs) != len(per_fold[method]):  # an older file listed only the folds with an input: no pairing
        return f"- {method} against k-means on the input it trained on: not paired (the folds are not known)."
    folds = [f for f, name in enumerate(inputs) if name is not None]
    names = [name for name in inputs if name is not None]

    def versus(rows: list[str]) -> str:
        parts = []
        for key, label in (("nmi", "NMI"), ("weighted_f1", "weighted F1")):
            a = np.array([per_fold[method][f][key] for f in folds], dtype=float)
            b = np.array([per_fold[name][f][key] for f, name in zip(folds, rows)], dtype=float)
            higher = f"{method} higher in {int((a > b).sum())} of {len(a)} folds"
            parts.append(f"{label} {np.nanmean(a):.3f} vs {np.nanmean(b):.3f} ({higher})")
        return "; ".join(parts)

    counts = ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))
    skipped = len(inputs) - len(folds)
    if skipped:
        counts += f" ({skipped} of {len(inputs)} folds trained end to end, no fixed input: left out)"
    row = f" (row {CHOSEN_INPUT_PREFIX}{method})" if CHOSEN_INPUT_PREFIX + method in per_fold else ""
    line = f"- {method} against k-means on the input it trained on, per fold{row}: {counts}; {versus(names)}"
    plain = [name.removesuffix("-zscored") for name in names]
    if plain != names and all(name in per_fold for name in plain):  # the same features before z-scoring
        line += f"; against k-means on those features before z-scoring: {versus(plain)}"
    return line + "."


def _pick(p: dict[str, Any]) -> str:
    """One fold's choice and the inner score that made it."""
    text = ", ".join(f"{k}={v}" for k, v in p.items() if not k.startswith("inner_val"))
    if "inner_val_score" in p:
        return text + (
            f" (inner NMI + weighted F1 {p['inner_val_score']} = {p['inner_val_nmi']} + {p['inner_val_weighted_f1']};"
            f" all candidates {p['inner_val_all']})"
        )
    return text + f" (inner MAP {p['inner_val_map']})"


def markdown_table(result: dict[str, Any]) -> str:
    name = Path(result["dataset"]).name
    repeats = result.get("repeats", 1)
    split = f"{result['folds']} folds" + (f" x {repeats} repeats" if repeats > 1 else "")
    lines = [
        f"### {name} ({result['images']} images, {result['groups']} groups, {split}, "
        f"wall {result['wall_s'] / 60:.1f} min)",
        "",
        "| method | MAP | MRR | P@1 | MAP@R | kNN acc | kNN bal. acc | probe AUC | probe bal. acc "
        "| probe AUC per patient | probe bal. acc per patient |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = result.get("selection", {}).get("chosen_per_fold", {})
    for method, s in result["summary"].items():
        cells = [_cell(s[k]) for k in RETRIEVAL_KEYS + PROBE_KEYS]
        kind = " (baseline)" if is_baseline(method) else ""
        lines.append(f"| {method}{kind} | " + " | ".join(cells) + " |")
    lines += cluster_table(result)
    fractions = {
        m: float(np.mean([r["labelled_fraction"] for r in runs]))
        for m, runs in result.get("per_fold", {}).items()
        if runs and "labelled_fraction" in runs[0]
    }
    if fractions:
        lines += [
            "",
            "Share of the training rows that kept a label (whole patient groups, mean over folds): "
            + ", ".join(f"{m} {v:.3f}" for m, v in fractions.items())
            + ".",
        ]
    if repeats > 1:
        spread = ", ".join(
            f"{m} {s['map']['repeat_std']:.3f}"
            for m, s in result["summary"].items()
            if s["map"].get("repeat_std") is not None
        )
        lines += [
            "",
            f"Mean ± std over all {result['folds'] * repeats} folds. "
            f"Std of the {repeats} repeats' MAP means: {spread}.",
        ]
    if chosen:
        lines += [
            "",
            "Selected per fold on an inner validation split of the training folds "
            f"(candidates {result['selection']['candidates']}):",
        ]
        criteria = result["selection"].get("criterion", {})
        for method, picks in chosen.items():
            by = "inner NMI + weighted F1" if criteria.get(method) == "nmi+weighted_f1" else "inner MAP"
            lines.append(f"- {method} (chosen by {by}): " + "; ".join(_pick(p) for p in picks))
    return "\n".join(lines) + "\n"


def write_outputs(results: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    from indexer.atomic import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "benchmark.json", out_dir / "benchmark.md"
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(markdown_table(r) for r in results))
    return js, md
