"""`retrieve benchmark`: what each training method buys, measured the same way for all.

Protocol: stratified k-fold grouped by patient and near-duplicate group (an image's patient and
near-dup group are never on both sides). Per fold: train on the training folds, index them, query
with the held-out fold (MAP, MRR, P@1, MAP@R, kNN accuracy, balanced accuracy); linear probe
(logistic regression on frozen vectors, paper 001) with AUC and balanced accuracy, per image and on
predictions averaged per patient. Baselines in the same run: raw pixels, random-init ResNet-18,
ImageNet EfficientNet-Lite0 features, and each random-init backbone a method trains (end to end) or
trains a head on (frozen), untouched. The split can be repeated with other seeds (`repeats`). Nothing
is tuned on the held-out fold: every method runs with its preset as written, or chooses options on an
inner split (`select`).

This module resolves the methods and runs the protocol; `folds` makes the splits, `scoring` scores a
fold, `benchmark_report` summarises and writes the results.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import load_dataset
from retrieval.embed import embed_rows, pick_device
from retrieval.encoders.base import concat_vectors
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError
from retrieval.evaluation.evaluate import EvalSettings, evaluate
from retrieval.training.benchmark_report import CHOSEN_INPUT_PREFIX, summarise_folds
from retrieval.training.cluster_eval import fold_cluster_scores, kmeans_assign, summarise_clusters
from retrieval.training.config import METHODS, TrainConfig, load_train_config
from retrieval.training.feature_cache import features_with_cache
from retrieval.training.folds import group_ids, inner_split, keep_label_fraction, make_folds
from retrieval.training.presets import PRESETS
from retrieval.training.scoring import score_fold
from retrieval.training.trainer import load_image_tensors, train


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def raw_pixel_vectors(images: torch.Tensor, side: int = 32) -> np.ndarray:
    """Downsampled pixels, centred per image, L2-normalised: the 'no learning at all' baseline."""
    x = F.interpolate(images.float().div(255), size=(side, side), mode="area").flatten(1)
    return _unit((x - x.mean(1, keepdim=True)).numpy())


def input_feature_name(cfg: TrainConfig) -> str:
    """The name of a frozen-backbone method's input features in the k-means rows: `imagenet-effnet-lite0` for
    the baseline's own features, else `<encoder>-<size>px` (and the weights file's stem, if any)."""
    if (cfg.encoder, cfg.weights, cfg.image_size) == ("imagenet-effnet-lite0", None, 224):
        return "imagenet-effnet-lite0"
    name = f"{cfg.encoder}-{cfg.image_size}px"
    return name if cfg.weights is None else f"{name}-{Path(cfg.weights).stem}"


def zscore(x: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Features z-scored with the training rows' mean and standard deviation (as `standardize_features`)."""
    return (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)


def kmeans_input_rows(cfg: TrainConfig, n_classes: int) -> list[tuple[str, bool]]:
    """The k-means rows on a frozen-backbone clustering configuration's own input, as (row name, z-scored?):
    its encoder's clean features (`kmeans-<input>`), then, when it trains on z-scores (`standardize_features`),
    their z-scores (`kmeans-<input>-zscored`); `-k<K>` is added for a K other than the number of classes. The
    last row is the input its head trains on. None (an empty list) for a method that trains its backbone: no
    fixed input."""
    if not (cfg.is_clustering and cfg.freeze_backbone):
        return []
    feat = input_feature_name(cfg) + (f"-k{cfg.clusters}" if cfg.clusters != n_classes else "")
    out = [(f"kmeans-{feat}", False)]
    if cfg.standardize_features:
        out.append((f"kmeans-{feat}-zscored", True))
    return out


def chosen_input_row(method: str) -> str:
    """The clustering row that holds, per fold, k-means on the input of the configuration `method` trained with
    on that fold (the inner split's choice, when `--select` changed the input)."""
    return f"{CHOSEN_INPUT_PREFIX}{method}"


def own_input_kmeans(
    features: np.ndarray,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    clusters: int,
    seed: int,
    standardize: bool,
) -> list[dict[str, Any]]:
    """k-means (K = `clusters`) on a clustering method's own input features, scored per fold like the other
    k-means baselines: fitted on the training folds' unit vectors (z-scored first with the training folds'
    mean/std when `standardize`), clusters matched to labels on the training folds, scored on the held-out fold."""
    out = []
    for tr, te in splits:
        x = _unit(zscore(features, tr) if standardize else features)
        out.append(fold_cluster_scores(kmeans_assign(x, tr, clusters, seed), labels, tr, te))
    return out


SELECTION_CRITERIA = {"retrieval": "map", "clustering": "nmi+weighted_f1"}


def inner_selection_score(
    cfg: TrainConfig,
    vectors: np.ndarray,
    assign: np.ndarray | None,
    rows: pd.DataFrame,
    itr: np.ndarray,
    iva: np.ndarray,
    k: int,
) -> dict[str, float]:
    """A candidate's score on the inner split (fitted on `itr`). A clustering method: NMI + weighted F1 of its
    clusters, matched to labels on the inner-train rows and scored on the inner-validation rows (paper 004's
    Algorithm 1, as on the outer folds); any other method: MAP of the inner-validation rows as queries against
    the inner-train rows. NaN where nothing can be scored."""
    if cfg.is_clustering and assign is not None:
        s = fold_cluster_scores(assign, rows["label"].astype(str).to_numpy(), itr, iva)
        return {"score": s["nmi"] + s["weighted_f1"], "nmi": s["nmi"], "weighted_f1": s["weighted_f1"]}
    val = np.zeros(len(rows), bool)
    val[iva] = True
    inner_gallery = np.zeros(len(rows), bool)
    inner_gallery[itr] = True
    try:
        r = evaluate(rows, vectors, EvalSettings(k=k), progress=False, query_mask=val, gallery_mask=inner_gallery)
        return {"score": float(r["overall"]["map"])}
    except RetrieveError:  # no validation query has a relevant inner-train image
        return {"score": float("nan")}


def candidate_grid(select: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the candidate values, e.g. {"augment_gain": [true, false]} -> 2 settings."""
    import itertools

    keys = sorted(select)
    return [dict(zip(keys, values)) for values in itertools.product(*(select[k] for k in keys))] or [{}]


def resolve_method_config(method: str, preset_dir: Path = PRESETS) -> TrainConfig:
    if method not in METHODS:
        raise RetrieveError(f"--methods: unknown method {method!r} (choose from {', '.join(METHODS)})")
    cpu = preset_dir / f"{method}-cpu.yaml"
    if not cpu.is_file():
        raise RetrieveError(f"--methods {method}: its preset {cpu} is missing (a broken install?)")
    return load_train_config(cpu, {"method": method})


def parse_method_spec(spec: str) -> tuple[str, float | None]:
    """`METHOD` or `METHOD@FRACTION`: train with that fraction of the training folds' labels (0.1 or 10%)."""
    method, sep, frac = spec.partition("@")
    if not sep:
        return spec, None
    try:
        value = float(frac[:-1]) / 100 if frac.endswith("%") else float(frac)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise RetrieveError(f"--methods {spec}: the label fraction after @ must lie in (0, 1] (e.g. 0.1 or 10%)")
    return method, value


class FoldFitter:
    """Trains a method on some rows and returns unit vectors for every row. Frozen-backbone features
    (clean + augmented views) are computed once per (encoder, weights, size, views, augmentations) and shared by
    every fold and method; `images` holds the preprocessed images per image size."""

    def __init__(
        self,
        rows: pd.DataFrame,
        images: dict[int, torch.Tensor],
        device: torch.device,
        seed: int = 0,
        progress: bool = True,
        timings: dict[str, float] | None = None,
        cache_root: Path | None | str = "default",
    ):
        self.rows, self.images, self.device, self.progress = rows, images, device, progress
        self.seed, self.cache_root = seed, cache_root
        self.labelled_fraction = 1.0  # share of the training rows that kept a label in the last fit
        self.timings = timings if timings is not None else {}
        self.caches: dict[tuple, torch.Tensor] = {}

    def frozen_cache(self, cfg: TrainConfig) -> torch.Tensor:
        aug = cfg.augment_config()
        key = (cfg.encoder, cfg.weights, cfg.image_size, cfg.frozen_views, aug)
        if key not in self.caches:
            t = time.perf_counter()
            enc = create_encoder(cfg.encoder, cfg.weights, cfg.seed)
            self.caches[key], hit = features_with_cache(
                enc,
                self.images[cfg.image_size],
                PreprocessConfig(image_size=cfg.image_size),
                cfg.frozen_views,
                self.seed,
                self.device,
                aug=aug,
                progress=self.progress,
                root=self.cache_root,
            )
            what = f"features {cfg.encoder} x{cfg.frozen_views + 1} views" + (" (disk cache)" if hit else "")
            self.timings[what] = round(time.perf_counter() - t, 1)
        return self.caches[key]

    def fit(self, cfg: TrainConfig, tr: np.ndarray) -> np.ndarray:
        """Train on rows `tr`, return unit vectors for every row."""
        return self.fit_clusters(cfg, tr)[0]

    def fit_clusters(self, cfg: TrainConfig, tr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Train on rows `tr`; unit vectors for every row and, for a clustering method, each row's cluster.
        Clustering methods get the training rows without their labels."""
        train_rows = self.rows.iloc[tr].reset_index(drop=True)
        if cfg.is_clustering:
            train_rows = train_rows.drop(columns=["label"])
        elif cfg.label_fraction < 1.0:
            train_rows = keep_label_fraction(train_rows, cfg.label_fraction, cfg.seed)
            labelled = train_rows["label"].notna().to_numpy()
            self.labelled_fraction = float(labelled.mean())
            if cfg.needs_labels:  # a supervised method trains on the labelled rows alone
                train_rows, tr = train_rows[labelled].reset_index(drop=True), tr[labelled]
        if cfg.freeze_backbone:
            cache = self.frozen_cache(cfg)
            res = train(train_rows, cfg, progress=False, features=cache[:, tr])
            with torch.no_grad():
                head = res.encoder.head(cache[0])
                chosen = {"head": head, "backbone": cache[0]}.get(cfg.vectors_from)
                vec = (chosen if chosen is not None else concat_vectors(head, cache[0], cfg.concat_weight)).numpy()
        else:
            res = train(train_rows, cfg, progress=self.progress)
            vec = embed_rows(self.rows, res.encoder, res.encoder.default_preprocess, progress=False).vectors
            head = torch.as_tensor(vec)
        assign = None
        if cfg.is_clustering:
            with torch.no_grad():
                cluster_head: Any = res.model.loss  # a ClusterLoss whenever cfg.is_clustering
                assign = cluster_head.cluster(head).argmax(1).numpy()
        return _unit(vec), assign


def run_benchmark(
    data: str | Path,
    methods: list[str],
    folds: int = 5,
    seed: int = 0,
    k: int = 10,
    preset_dir: Path = PRESETS,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log=print,
    select: dict[str, list[Any]] | None = None,
    repeats: int = 1,
    cache: Path | None | str = "default",
) -> dict[str, Any]:
    """`select` lists candidate values of training options; each fold picks one on an inner validation split
    of its training folds (never the held-out fold) and the choices are reported: by MAP, or for a clustering
    method by NMI + weighted F1 of its clusters (`inner_selection_score`). Each frozen-backbone clustering
    method also gets k-means (same K) on its own input features (and on their z-scores when it trains on
    z-scores), on the same folds (`own_input_kmeans`; named in `clustering.own_input_kmeans`), for each distinct
    input among its `select` candidates (encoder, image size, standardize_features, K), computed once per
    input; `clustering.chosen_input_kmeans` names per fold the row of the input the fold trained on (the
    inner split's choice; None for a fold whose choice trains its backbone end to end, so has no fixed input),
    and with a selection the row `kmeans-chosen-input-<method>` holds those folds (only when every fold has one).
    `select` keys and values are checked against the training options before any work.
    `repeats` > 1 repeats the k-fold split with seeds seed, seed + 1, ...: on small archives the split
    alone moves MAP by about a fold's spread, and the mean over repeats is the steadier figure.
    `METHOD@FRACTION` in `methods` (e.g. `fixmatch@0.1`, `supcon@10%`) keeps that fraction of each fold's
    training labels, chosen by patient group (`keep_label_fraction`, seeded per fold, so every method with
    the same fraction gets the same labelled rows); supervised methods train on those rows alone, fixmatch
    also on the rest, unlabelled. Frozen-backbone features go through the disk cache `cache`
    ("default": `feature_cache.cache_root()`; None: no cache)."""
    t_start = time.perf_counter()
    table = load_dataset(data)
    rows = table.rows[table.rows["label"].notna()].reset_index(drop=True)
    configs = {}
    for m in methods:
        base, fraction = parse_method_spec(m)
        common = {k: v for k, v in (overrides or {}).items() if "." not in k}
        mine = {k[len(base) + 1 :]: v for k, v in (overrides or {}).items() if k.startswith(f"{base}.")}
        if fraction is not None:
            mine["label_fraction"] = fraction
            mine.update({k[len(m) + 1 :]: v for k, v in (overrides or {}).items() if k.startswith(f"{m}.")})
        options = {**common, **mine}
        unknown = sorted(set(options) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise RetrieveError(f"--set {unknown[0]}: not a training option")
        configs[m] = replace(resolve_method_config(base, preset_dir), **options)
        if configs[m].is_clustering and "clusters" not in options:
            configs[m] = replace(configs[m], clusters=rows["label"].nunique())  # K = classes, as k-means
        if configs[m].label_fraction < 1.0 and not (configs[m].needs_labels or base == "fixmatch"):
            raise RetrieveError(f"--methods {m}: {base} reads no labels, so a label fraction means nothing")
    unknown = sorted(set(select or {}) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise RetrieveError(f"--select {unknown[0]}: not a training option")
    for c in configs.values():  # every candidate setting is checked before any work (bad values too)
        for cand in candidate_grid(select or {}):
            replace(c, **cand)
    if repeats < 1:
        raise RetrieveError(f"--repeats {repeats}: must be at least 1")
    splits = [split for r in range(repeats) for split in make_folds(rows, folds, seed + r)]
    device = pick_device()
    results: dict[str, list[dict[str, float]]] = {}
    timings: dict[str, float] = {}

    # one image load for raw pixels and every frozen-feature cache (image size of the presets)
    sizes = {c.image_size for c in configs.values()} | {224} | set((select or {}).get("image_size", []))
    images = {s: load_image_tensors(rows, PreprocessConfig(image_size=s))[0] for s in sizes}
    fitter = FoldFitter(rows, images, device, seed, progress, timings, cache)

    def clean_vectors(enc, size: int) -> np.ndarray:
        feats, _ = features_with_cache(
            enc, images[size], PreprocessConfig(image_size=size), 0, seed, device, progress=progress, root=cache
        )
        return _unit(feats[0].numpy())

    # baselines: fixed vectors, scored on the same folds
    t = time.perf_counter()
    base_vectors = {
        "raw-pixels": raw_pixel_vectors(images[224]),
        "random-resnet18": clean_vectors(create_encoder("resnet18", None, seed), 224),
    }
    effnet_cfg = next(
        (
            c
            for c in configs.values()
            if c.freeze_backbone and c.encoder == "imagenet-effnet-lite0" and c.image_size == 224
        ),
        TrainConfig(encoder="imagenet-effnet-lite0", image_size=224, frozen_views=0),
    )
    base_vectors["imagenet-effnet-lite0"] = _unit(fitter.frozen_cache(effnet_cfg)[0].numpy())  # view 0: the clean image
    grid = candidate_grid(select or {})
    # each random-init backbone, trained or under a trained head, untouched: what training bought (for every
    # `select` candidate too, which may change the encoder or the image size)
    seen: set[str] = set()  # each backbone is built once, however many methods and candidates share it
    for cfg in [replace(c, **cand) for c in configs.values() for cand in grid]:
        name = (
            "random-resnet18"
            if (cfg.encoder, cfg.image_size) == ("resnet18", 224)
            else f"random-{cfg.encoder}-{cfg.image_size}px"
        )
        if cfg.weights is not None or name in seen or name in base_vectors:
            continue
        seen.add(name)
        init = create_encoder(cfg.encoder, None, seed)
        if not init.source.startswith("random init"):  # pretrained weights or a checkpoint
            continue
        # a frozen head's baseline is view 0 of the very cache it trains on (the folds reuse it)
        base_vectors[name] = (
            _unit(fitter.frozen_cache(replace(cfg, seed=seed))[0].numpy())
            if cfg.freeze_backbone
            else clean_vectors(init, cfg.image_size)
        )
    timings["baselines"] = round(time.perf_counter() - t, 1)
    for name, vec in base_vectors.items():
        results[name] = [score_fold(rows, vec, tr, te, k) for tr, te in splits]
        log(f"{name}: MAP {np.mean([r['map'] for r in results[name]]):.4f}")
    labels = rows["label"].astype(str).to_numpy()
    n_classes = len(set(labels))
    clustering: dict[str, list[dict[str, Any]]] = {}
    own_inputs: dict[str, list[str]] = {}  # clustering method -> the k-means rows on its candidates' own inputs
    if any(c.is_clustering for c in configs.values()):  # k-means baselines, K = classes, same folds
        for name in ("raw-pixels", "imagenet-effnet-lite0"):
            clustering[f"kmeans-{name}"] = [
                fold_cluster_scores(kmeans_assign(base_vectors[name], tr, n_classes, seed), labels, tr, te)
                for tr, te in splits
            ]
            log(f"kmeans-{name}: NMI {np.mean([r['nmi'] for r in clustering[f'kmeans-{name}']]):.4f}")
        t = time.perf_counter()
        # k-means (same K) on the own input of each frozen clustering method, for every `--select` candidate
        # (a candidate may change encoder, image size, standardize_features or K): once per distinct input
        for method, cfg in configs.items():
            for cand in grid:
                cfg_c = replace(cfg, **cand)
                for name, standardize in kmeans_input_rows(cfg_c, n_classes):
                    if name not in clustering:
                        x = fitter.frozen_cache(replace(cfg_c, seed=seed))[0].numpy()  # view 0: the clean images
                        clustering[name] = own_input_kmeans(x, labels, splits, cfg_c.clusters, seed, standardize)
                        log(f"{name}: NMI {np.mean([r['nmi'] for r in clustering[name]]):.4f}")
                    if name not in own_inputs.get(method, []):
                        own_inputs.setdefault(method, []).append(name)
        timings["kmeans on own input"] = round(time.perf_counter() - t, 1)

    selections: dict[str, list[dict[str, Any]]] = {}
    chosen_inputs: dict[str, list[str | None]] = {}  # clustering method -> per fold, its input's k-means row
    for method, cfg in configs.items():
        t = time.perf_counter()
        per_fold, chosen, cluster_folds, input_rows = [], [], [], []
        for f, (tr, te) in enumerate(splits):
            cfg_f = replace(cfg, seed=seed + f)
            if len(grid) > 1:  # nested selection: inner split of the training folds only
                itr, iva = inner_split(rows, tr, seed + f)
                inner = []
                for cand in grid:
                    cfg_c = replace(cfg_f, **cand)
                    vec_c, assign_c = fitter.fit_clusters(cfg_c, itr)
                    inner.append(inner_selection_score(cfg_c, vec_c, assign_c, rows, itr, iva, k))
                scores = np.array([s["score"] for s in inner], dtype=float)
                i = 0 if np.all(np.isnan(scores)) else int(np.nanargmax(scores))
                best = grid[i]
                note = None if np.isnan(scores[i]) else round(float(scores[i]), 4)
                if cfg_f.is_clustering:  # chosen by the clustering score; MAP plays no part
                    chosen.append(
                        {
                            **best,
                            "inner_val_score": note,
                            "inner_val_nmi": round(inner[i]["nmi"], 4),
                            "inner_val_weighted_f1": round(inner[i]["weighted_f1"], 4),
                            "inner_val_all": [None if np.isnan(v) else round(float(v), 4) for v in scores],
                        }
                    )
                else:
                    chosen.append({**best, "inner_val_map": note})
                cfg_f = replace(cfg_f, **best)
            vec, assign = fitter.fit_clusters(cfg_f, tr)
            own = kmeans_input_rows(cfg_f, n_classes)
            # the input this fold's configuration trained on (z-scored when it z-scores); None: end to end
            input_rows.append(own[-1][0] if own else None)
            per_fold.append(score_fold(rows, vec, tr, te, k))
            if cfg_f.label_fraction < 1.0:
                per_fold[-1]["labelled_fraction"] = fitter.labelled_fraction
            if assign is not None:
                cluster_folds.append(fold_cluster_scores(assign, labels, tr, te))
            log(
                f"{method} fold {f + 1}/{len(splits)}: MAP {per_fold[-1]['map']:.4f}"
                + (f", NMI {cluster_folds[-1]['nmi']:.4f}" if assign is not None else "")
                + (f" (chose {chosen[-1]})" if chosen else "")
            )
        results[method] = per_fold
        if cluster_folds:
            clustering[method] = cluster_folds
        if chosen:
            selections[method] = chosen
        if any(n is not None for n in input_rows):  # one entry per fold, None where it trained end to end
            chosen_inputs[method] = input_rows
            # the selection may change the input from fold to fold: one row that follows it, only when every
            # fold has an input (a mean over some folds would not compare with the method's mean over all)
            every = [n for n in input_rows if n is not None]  # == input_rows when no fold trained end to end
            if chosen and len(every) == len(input_rows):
                clustering[chosen_input_row(method)] = [clustering[n][f] for f, n in enumerate(every)]
        timings[method] = round(time.perf_counter() - t, 1)

    summary = {name: summarise_folds(runs, folds) for name, runs in results.items()}
    return {
        "dataset": str(data),
        "images": len(rows),
        "classes": sorted(rows["label"].astype(str).unique()),
        "folds": folds,
        "repeats": repeats,
        "seed": seed,
        "k": k,
        "groups": int(len(np.unique(group_ids(rows)))),
        "methods": {m: c.to_dict() for m, c in configs.items()},
        "per_fold": results,
        "summary": summary,
        "selection": {
            "candidates": select or {},
            "chosen_per_fold": selections,
            "criterion": {
                m: SELECTION_CRITERIA["clustering" if configs[m].is_clustering else "retrieval"] for m in selections
            },
        },
        "clustering": {
            "own_input_kmeans": own_inputs,
            "chosen_input_kmeans": chosen_inputs,
            "per_fold": clustering,
            "summary": {name: summarise_clusters(runs) for name, runs in clustering.items()},
        },
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "device": str(device),
        "torch": torch.__version__,
    }
