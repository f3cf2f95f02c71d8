"""`retrieve benchmark`: what each training method buys, measured the same way for all.

Protocol: stratified k-fold grouped by patient and near-duplicate group (an image's patient and
near-dup group are never on both sides). Per fold: train on the training folds, index them, query
with the held-out fold (MAP, MRR, P@1, MAP@R, kNN accuracy, balanced accuracy); linear probe
(logistic regression on frozen vectors, paper 001) with AUC and balanced accuracy. Baselines in the
same run: raw pixels, random-init ResNet-18, ImageNet EfficientNet-Lite0 features. Nothing is tuned
on the held-out fold: every method runs with its preset as written.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.embed import embed_rows, pick_device
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError
from retrieval.evaluation.evaluate import EvalSettings, evaluate
from retrieval.training.config import METHODS, TrainConfig, load_train_config
from retrieval.training.trainer import cached_features, load_image_tensors, train

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "train"
BASELINES = ("raw-pixels", "random-resnet18", "imagenet-effnet-lite0")
RETRIEVAL_KEYS = ("map", "mrr", "p@1", "map@r", "knn_accuracy", "knn_balanced_accuracy")
PROBE_KEYS = ("probe_auc", "probe_balanced_accuracy")


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


def linear_probe(vectors: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray) -> dict[str, float]:
    """Logistic regression on standardised frozen vectors: AUC (macro one-vs-rest), balanced accuracy."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    pipe.fit(vectors[train_idx], labels[train_idx])
    clf = pipe[-1]
    prob = pipe.predict_proba(vectors[test_idx])
    y = labels[test_idx]
    if len(clf.classes_) == 2:
        auc = roc_auc_score(y == clf.classes_[1], prob[:, 1]) if len(set(y)) == 2 else float("nan")
    else:
        present = [c for c in clf.classes_ if c in set(y)]
        auc = roc_auc_score(y, prob, multi_class="ovr", labels=list(clf.classes_)) if len(present) == len(clf.classes_) else float("nan")
    return {"probe_auc": float(auc), "probe_balanced_accuracy": float(balanced_accuracy_score(y, clf.classes_[prob.argmax(1)]))}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def raw_pixel_vectors(images: torch.Tensor, side: int = 32) -> np.ndarray:
    """Downsampled pixels, centred per image, L2-normalised: the 'no learning at all' baseline."""
    x = F.interpolate(images.float().div(255), size=(side, side), mode="area").flatten(1)
    return _unit((x - x.mean(1, keepdim=True)).numpy())


def score_fold(rows: pd.DataFrame, vectors: np.ndarray, tr: np.ndarray, te: np.ndarray, k: int) -> dict[str, float]:
    test = np.zeros(len(rows), bool)
    test[te] = True
    res = evaluate(rows, vectors, EvalSettings(k=k), progress=False, query_mask=test, gallery_mask=~test)
    out = {key: res["overall"][key] for key in RETRIEVAL_KEYS}
    out.update(linear_probe(vectors, rows["label"].astype(str).to_numpy(), tr, te))
    return out


def candidate_grid(select: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the candidate values, e.g. {"augment_gain": [true, false]} -> 2 settings."""
    import itertools

    keys = sorted(select)
    return [dict(zip(keys, values)) for values in itertools.product(*(select[k] for k in keys))] or [{}]


def inner_split(rows: pd.DataFrame, tr: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One grouped, stratified split of the training folds: about 3/4 inner-train, 1/4 validation."""
    sub = rows.iloc[tr].reset_index(drop=True)
    n_groups = len(np.unique(group_ids(sub)))
    k = 4 if n_groups >= 8 else 2
    itr, iva = make_folds(sub, k, seed + 1000)[0]
    return tr[itr], tr[iva]


def resolve_method_config(method: str, preset_dir: Path = PRESETS) -> TrainConfig:
    if method not in METHODS:
        raise RetrieveError(f"--methods: unknown method {method!r} (choose from {', '.join(METHODS)})")
    cpu = preset_dir / f"{method}-cpu.yaml"
    return load_train_config(cpu if cpu.is_file() else None, {"method": method})


def run_benchmark(data: str | Path, methods: list[str], folds: int = 5, seed: int = 0, k: int = 10,
                  preset_dir: Path = PRESETS, overrides: dict[str, Any] | None = None, progress: bool = True,
                  log=print, select: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """`select` lists candidate values of training options; each fold picks one by MAP on an inner
    validation split of its training folds (never the held-out fold) and the choices are reported."""
    t_start = time.perf_counter()
    table = load_dataset(data)
    rows = table.rows[table.rows["label"].notna()].reset_index(drop=True)
    configs = {}
    for m in methods:
        mine = {k.split(".", 1)[1]: v for k, v in (overrides or {}).items() if k.startswith(f"{m}.")}
        common = {k: v for k, v in (overrides or {}).items() if "." not in k}
        try:
            configs[m] = replace(resolve_method_config(m, preset_dir), **{**common, **mine})
        except TypeError as exc:
            raise RetrieveError(f"--set: {str(exc).split('got ')[-1]} (not a training option)") from None
    splits = make_folds(rows, folds, seed)
    device = pick_device()
    results: dict[str, list[dict[str, float]]] = {}
    timings: dict[str, float] = {}

    # one image load for raw pixels and every frozen-feature cache (image size of the presets)
    sizes = {c.image_size for c in configs.values()} | {224} | set((select or {}).get("image_size", []))
    images = {s: load_image_tensors(rows, PreprocessConfig(image_size=s))[0] for s in sizes}
    gen = torch.Generator().manual_seed(seed)
    caches: dict[tuple, torch.Tensor] = {}

    def frozen_cache(cfg: TrainConfig) -> torch.Tensor:
        key = (cfg.encoder, cfg.weights, cfg.image_size, cfg.frozen_views, cfg.augment_gain)
        if key not in caches:
            from retrieval.training.augment import AugmentConfig

            t = time.perf_counter()
            enc = create_encoder(cfg.encoder, cfg.weights, cfg.seed).to(device)
            aug = AugmentConfig() if cfg.augment_gain else AugmentConfig(gain=(1.0, 1.0))
            caches[key] = cached_features(enc, images[cfg.image_size], cfg.frozen_views, gen, device, progress=progress, aug=aug)
            timings[f"features {cfg.encoder} x{cfg.frozen_views + 1} views"] = round(time.perf_counter() - t, 1)
        return caches[key]

    # baselines: fixed vectors, scored on the same folds
    t = time.perf_counter()
    base_vectors = {"raw-pixels": raw_pixel_vectors(images[224])}
    rnd = create_encoder("resnet18", None, seed).to(device)
    base_vectors["random-resnet18"] = _unit(cached_features(rnd, images[224], 0, gen, device, progress=progress)[0].numpy())
    effnet_cfg = next((c for c in configs.values() if c.freeze_backbone and c.encoder == "imagenet-effnet-lite0" and c.image_size == 224),
                      TrainConfig(encoder="imagenet-effnet-lite0", image_size=224, frozen_views=0))
    base_vectors["imagenet-effnet-lite0"] = _unit(frozen_cache(effnet_cfg)[0].numpy())  # view 0: the clean image
    timings["baselines"] = round(time.perf_counter() - t, 1)
    for name, vec in base_vectors.items():
        results[name] = [score_fold(rows, vec, tr, te, k) for tr, te in splits]
        log(f"{name}: MAP {np.mean([r['map'] for r in results[name]]):.4f}")

    def fit_vectors(cfg_f: TrainConfig, tr: np.ndarray) -> np.ndarray:
        """Train on rows `tr`, return unit vectors for every row."""
        if cfg_f.freeze_backbone:
            cache = frozen_cache(cfg_f)
            res = train(rows.iloc[tr].reset_index(drop=True), cfg_f, progress=False, features=cache[:, tr])
            with torch.no_grad():
                vec = res.encoder.head(cache[0]).numpy() if cfg_f.vectors_from == "head" else cache[0].numpy()
            return _unit(vec)
        res = train(rows.iloc[tr].reset_index(drop=True), cfg_f, progress=progress)
        return embed_rows(rows, res.encoder, res.encoder.default_preprocess, progress=False).vectors

    grid = candidate_grid(select or {})
    selections: dict[str, list[dict[str, Any]]] = {}
    for method, cfg in configs.items():
        t = time.perf_counter()
        per_fold, chosen = [], []
        for f, (tr, te) in enumerate(splits):
            cfg_f = replace(cfg, seed=seed + f)
            if len(grid) > 1:  # nested selection: inner split of the training folds only
                itr, iva = inner_split(rows, tr, seed + f)
                val = np.zeros(len(rows), bool)
                val[iva] = True
                inner_gallery = np.zeros(len(rows), bool)
                inner_gallery[itr] = True
                scores = []
                for cand in grid:
                    vec = fit_vectors(replace(cfg_f, **cand), itr)
                    try:
                        r = evaluate(rows, vec, EvalSettings(k=k), progress=False, query_mask=val, gallery_mask=inner_gallery)
                        scores.append(r["overall"]["map"])
                    except RetrieveError:  # no validation query has a relevant inner-train image
                        scores.append(float("nan"))
                if np.all(np.isnan(scores)):
                    best, note = grid[0], None
                else:
                    best, note = grid[int(np.nanargmax(scores))], round(float(np.nanmax(scores)), 4)
                chosen.append({**best, "inner_val_map": note})
                cfg_f = replace(cfg_f, **best)
            per_fold.append(score_fold(rows, fit_vectors(cfg_f, tr), tr, te, k))
            log(f"{method} fold {f + 1}/{folds}: MAP {per_fold[-1]['map']:.4f}" + (f" (chose {chosen[-1]})" if chosen else ""))
        results[method] = per_fold
        if chosen:
            selections[method] = chosen
        timings[method] = round(time.perf_counter() - t, 1)

    summary = {name: {key: {"mean": float(np.nanmean([r[key] for r in runs])), "std": float(np.nanstd([r[key] for r in runs]))}
                      for key in RETRIEVAL_KEYS + PROBE_KEYS} for name, runs in results.items()}
    return {
        "dataset": str(data), "images": len(rows), "classes": sorted(rows["label"].astype(str).unique()), "folds": folds,
        "seed": seed, "k": k, "groups": int(len(np.unique(group_ids(rows)))),
        "methods": {m: c.to_dict() for m, c in configs.items()}, "per_fold": results, "summary": summary,
        "selection": {"candidates": select or {}, "chosen_per_fold": selections},
        "timings_s": timings, "wall_s": round(time.perf_counter() - t_start, 1),
        "device": str(device), "torch": torch.__version__,
    }


def markdown_table(result: dict[str, Any]) -> str:
    name = Path(result["dataset"]).name
    lines = [f"### {name} ({result['images']} images, {result['groups']} groups, {result['folds']} folds, "
             f"wall {result['wall_s'] / 60:.1f} min)", "",
             "| method | MAP | MRR | P@1 | MAP@R | kNN acc | kNN bal. acc | probe AUC | probe bal. acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    chosen = result.get("selection", {}).get("chosen_per_fold", {})
    for method, s in result["summary"].items():
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in RETRIEVAL_KEYS + PROBE_KEYS]
        kind = " (baseline)" if method in BASELINES else ""
        lines.append(f"| {method}{kind} | " + " | ".join(cells) + " |")
    if chosen:
        lines += ["", f"Selected per fold on an inner validation split of the training folds (candidates {result['selection']['candidates']}):"]
        for method, picks in chosen.items():
            lines.append(f"- {method}: " + "; ".join(", ".join(f"{k}={v}" for k, v in p.items() if k != "inner_val_map") + f" (inner MAP {p['inner_val_map']})" for p in picks))
    return "\n".join(lines) + "\n"


def write_outputs(results: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    from indexer.atomic import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "benchmark.json", out_dir / "benchmark.md"
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(markdown_table(r) for r in results))
    return js, md
