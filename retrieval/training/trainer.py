"""One training loop for every method. The backbone either trains on augmented images, or stays
frozen while only the head trains on cached features of clean and augmented views (fast on a CPU)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from retrieval.config import PreprocessConfig
from retrieval.data.dataset import FrameDataset, Skipped
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import create_encoder
from retrieval.errors import RetrieveError
from retrieval.training.augment import AugmentConfig, augment
from retrieval.training.config import TrainConfig
from retrieval.training.folds import group_ids
from retrieval.training.losses import LOSSES, Batch, LossContext, MethodLoss


class TrainModel(nn.Module):
    """The encoder being trained plus the method's loss, which owns the heads only training needs."""

    def __init__(self, encoder: Encoder, loss: MethodLoss):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def project(self, f: torch.Tensor) -> torch.Tensor:
        return self.encoder.head(f)


def attach_head(enc: Encoder, head_dims: list[int]) -> Encoder:
    """A copy of `enc` sharing its backbone, with a fresh projection head."""
    return Encoder(
        enc.backbone,
        enc.feature_dim,
        enc.base_arch,
        in_chans=enc.in_chans,
        mean=tuple(enc.arch["mean"]),
        std=tuple(enc.arch["std"]),
        head_dims=head_dims,
        default_preprocess=enc.default_preprocess,
        source=enc.source,
    )


@dataclass
class TrainResult:
    encoder: Encoder
    model: TrainModel
    classes: list[str]
    log: dict = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)


def load_image_tensors(rows: pd.DataFrame, pre: PreprocessConfig) -> tuple[torch.Tensor, np.ndarray, list[Skipped]]:
    """All images as one (N, 1, S, S) uint8 tensor (small archives fit in memory); unreadable ones skipped."""
    ds = FrameDataset(rows, pre)
    keep, tensors, skipped = [], [], []
    for i in range(len(ds)):
        t, _, err = ds[i]
        if t is None:
            path, _, reason = err.partition(": ")
            skipped.append(Skipped(path, reason))
            continue
        keep.append(i)
        tensors.append((t * 255).round().to(torch.uint8))
    if not tensors:
        raise RetrieveError("no readable training images")
    return torch.stack(tensors), np.array(keep), skipped


@torch.no_grad()
def cached_features(
    encoder: Encoder,
    images: torch.Tensor,
    views: int,
    gen: torch.Generator,
    device,
    batch: int = 64,
    progress: bool = True,
    aug: AugmentConfig = AugmentConfig(),
) -> torch.Tensor:
    """Backbone features (V + 1, N, D): the clean image, then `views` augmented copies."""
    encoder.eval()
    out = torch.zeros(views + 1, len(images), encoder.feature_dim)
    bar = tqdm(total=(views + 1) * len(images), desc="caching features", unit="img", disable=not progress, leave=False)
    for v in range(views + 1):
        for s in range(0, len(images), batch):
            x = images[s : s + batch].float().div_(255)
            if v:
                x = augment(x, aug, generator=gen)
            out[v, s : s + batch] = encoder.features(x.to(device)).float().cpu()
            bar.update(len(x))
    bar.close()
    return out


def train(
    rows: pd.DataFrame,
    cfg: TrainConfig,
    pairs_table: pd.DataFrame | None = None,
    progress: bool = True,
    features: torch.Tensor | None = None,
) -> TrainResult:
    """Train cfg.method on the images of `rows`; `features` may hand in cached frozen features."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    base = create_encoder(cfg.encoder, cfg.weights, cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        encoder = attach_head(base, cfg.head_dims)
    pre = PreprocessConfig(image_size=cfg.image_size, crop_sector=cfg.crop_sector)
    encoder.default_preprocess = pre
    labels_text = rows["label"].astype("string") if "label" in rows else pd.Series([pd.NA] * len(rows), dtype="string")
    if cfg.needs_labels and pairs_table is None and labels_text.isna().any():
        n_missing = int(labels_text.isna().sum())
        raise RetrieveError(
            f"--method {cfg.method} needs a label for every image ({n_missing} have none); use simclr or a pairs file"
        )
    skipped: list[Skipped] = []
    if features is None:
        images, keep, skipped = load_image_tensors(rows, pre)
    else:
        images, keep = None, np.arange(len(rows))
    if cfg.is_clustering and cfg.clusters > len(keep):
        raise RetrieveError(f"--clusters {cfg.clusters}: more clusters than training images ({len(keep)})")
    classes = sorted(labels_text.iloc[keep].dropna().unique().tolist())
    codes = np.array([classes.index(v) if isinstance(v, str) else -1 for v in labels_text.iloc[keep].tolist()])
    pair_rows = _pair_indices(rows.iloc[keep].reset_index(drop=True), pairs_table)
    aug_cfg = cfg.augment_config()

    if cfg.freeze_backbone:
        for p in encoder.backbone.parameters():
            p.requires_grad_(False)
        if features is not None:
            cache = features
        else:
            assert images is not None  # decoded whenever no cached features were given
            cache = cached_features(encoder, images, cfg.frozen_views, gen, device, progress=progress, aug=aug_cfg)
        cache = cache.to(device)
        if cfg.standardize_features:  # z-scores of the training rows' clean features; folded into the head below
            shift, scale = cache[0].mean(0), cache[0].std(0) + 1e-6
            cache = (cache - shift) / scale

        def feats(rows_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(rows_idx)
            v = torch.randint(cache.shape[0], (len(t),), generator=gen)
            return cache[v.to(device), t.to(device)]

        def clean() -> torch.Tensor:
            return cache[0]

        def clean_rows(rows_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
            return cache[0, torch.as_tensor(rows_idx).to(device)]
    else:
        assert images is not None  # end-to-end training always decodes the images
        pixels = images

        def feats(rows_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
            x = pixels[torch.as_tensor(rows_idx)].float().div_(255)
            return encoder.features(augment(x, aug_cfg, generator=gen).to(device))

        def clean() -> torch.Tensor:
            return cached_features(encoder, pixels, 0, gen, device, progress=False)[0]

        def clean_rows(rows_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
            return encoder.features(pixels[torch.as_tensor(rows_idx)].float().div_(255).to(device))

    kept = rows.iloc[keep].reset_index(drop=True)
    # patient groups: read by fixmatch_pseudo_groups alone (group_ids is a Python loop over the rows)
    has_groups = bool({"patient_id", "near_dup_group"} & set(kept.columns))
    groups = group_ids(kept) if cfg.fixmatch_pseudo_groups and has_groups else None
    ctx = LossContext(cfg, encoder, len(classes), codes, gen, cfg.freeze_backbone, pair_rows, clean, classes, groups)
    model = TrainModel(encoder, LOSSES[cfg.method](ctx)).to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(keep)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    weights = None
    if cfg.balanced and (codes >= 0).all() and len(classes) > 1:
        counts = np.bincount(codes, minlength=len(classes))
        weights = torch.as_tensor(1.0 / counts[codes], dtype=torch.float64)
    steps: list[dict[str, Any]] = []
    log = {"config": cfg.to_dict(), "classes": classes, "n_images": n, "steps": steps}
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"training {cfg.method}", unit="step", disable=not progress, leave=False)
    step = 0
    model.train()
    if cfg.freeze_backbone:
        encoder.backbone.eval()
    while step < total:
        order = (
            torch.multinomial(weights, n, replacement=True, generator=gen)
            if weights is not None
            else torch.randperm(n, generator=gen)
        ).numpy()
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if len(idx) < 2 or step >= total:
                continue
            y = torch.as_tensor(codes[idx], device=device)
            loss = model.loss(Batch(idx, y, feats, model.project, clean_rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            steps.append({"step": step, "epoch": (step - 1) // steps_per_epoch + 1, "loss": float(loss.detach())})
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            bar.update(1)
    bar.close()
    log["seconds"] = round(time.perf_counter() - t0, 2)
    model.eval()
    with torch.no_grad():
        log.update(model.loss.finish(model.project))
    if cfg.freeze_backbone and cfg.standardize_features:
        fold_standardisation(encoder.head, shift, scale)
    final = encoder if cfg.vectors_from != "backbone" else attach_head(encoder, [])
    if cfg.vectors_from == "concat":  # the checkpoint's arch carries the weight, so it rebuilds the same vectors
        final.concat_weight = float(cfg.concat_weight)
        final.arch["concat_weight"] = final.concat_weight
    for p in final.parameters():
        p.requires_grad_(True)
    return TrainResult(final.cpu().eval(), model.cpu().eval(), classes, log, skipped)


@torch.no_grad()
def fold_standardisation(head: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Make `head` take raw features: its first Linear (W, b) on (f - shift) / scale equals (W / scale) f +
    b - W (shift / scale), so a checkpoint needs no extra layer and gives the trained vectors."""
    first = next(m for m in head.modules() if isinstance(m, nn.Linear))
    first.bias.copy_(first.bias - first.weight @ (shift / scale))
    first.weight.copy_(first.weight / scale[None, :])


def _pair_indices(rows: pd.DataFrame, pairs_table: pd.DataFrame | None) -> np.ndarray | None:
    """Map a pairs table (path_a, path_b, same) onto row indices; unknown paths are an error."""
    if pairs_table is None:
        return None
    missing_cols = {"path_a", "path_b", "same"} - set(pairs_table.columns)
    if missing_cols:
        raise RetrieveError(f"pairs file is missing column(s): {', '.join(sorted(missing_cols))}")
    by_path = {str(Path(p).resolve()): i for i, p in enumerate(rows["path"])}
    out = []
    for rec in pairs_table.to_dict("records"):
        ends = [by_path.get(str(Path(str(rec[c])).resolve())) for c in ("path_a", "path_b")]
        for c, found in zip(("path_a", "path_b"), ends):
            if found is None:
                raise RetrieveError(f"pairs file: {rec[c]} is not an image of the dataset")
        out.append((ends[0], ends[1], int(rec["same"])))
    if not out:
        raise RetrieveError("pairs file has no rows")
    return np.array(out, dtype=np.int64)


def write_training_log(log: dict, out_base: Path) -> tuple[Path, Path]:
    """`<out>.log.json` and `<out>.loss.png` (per-step loss and epoch means)."""
    from indexer.atomic import atomic_path
    from retrieval.evaluation.report import _plt

    json_path, png_path = out_base.with_suffix(".log.json"), out_base.with_suffix(".loss.png")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(log, indent=2))
    plt = _plt()
    steps = pd.DataFrame(log["steps"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if len(steps):
        ax.plot(steps["step"], steps["loss"], lw=0.8, alpha=0.5, label="step")
        per_epoch = steps.groupby("epoch").agg(step=("step", "max"), loss=("loss", "mean"))
        ax.plot(per_epoch["step"], per_epoch["loss"], lw=2, marker="o", ms=3, label="epoch mean")
    ax.set(xlabel="step", ylabel="loss", title=f"{log['config']['method']} on {log['n_images']} images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return json_path, png_path
