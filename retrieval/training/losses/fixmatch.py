"""`fixmatch` (Sohn et al. 2020; paper 004, M7): labelled rows train a classifier; on every row of the
batch a confident prediction (max probability >= tau) on the weak view becomes the pseudo-label that the
strong view is trained to predict. An empty label marks an unlabelled image.

Views: the weak view is the image without augmentation (with a frozen backbone, cached view 0), the
strong view one of the training augmentations (rotation, shear, zoom, crop, flip, gain, blur; no colour
changes, ultrasound-safe). Per step: the batch is the unlabelled part (mu B rows) and B = batch / mu
labelled rows are drawn beside it.

Options for hard data, where tau = 0.95 leaves almost no pseudo-labels:
- `fixmatch_align: true`: distribution alignment (ReMixMatch, Berthelot et al. 2020): the weak view's
  probabilities are multiplied by (labelled class frequencies / running mean of the model's predictions
  over the last 32 steps) and renormalised before thresholding.
- `fixmatch_thresholds: flex`: FlexMatch's curriculum thresholds (Zhang et al. 2021): class c's threshold
  is tau * M(beta_c), M(x) = x / (2 - x), beta_c = the number of rows whose last confident (> tau)
  prediction was c, over max(the largest such count, the rows never confidently predicted) (warm-up).

Multi-label manifests: a label `liver|kidney` names several classes. Then (paper 004, section 2.3.2)
- `fixmatch_multilabel: one-head`: one sigmoid head over the classes; labelled rows by binary cross-
  entropy, pseudo-label = 1[p >= 0.5] of the weak view, used when some class's p exceeds tau;
- `fixmatch_multilabel: two-head` (the paper's better variant): a softmax head over the label
  combinations seen in training, trained by FixMatch as above, plus a sigmoid head over the classes
  trained by binary cross-entropy on the labelled rows.
A seeded share `fixmatch_val_fraction` of the labelled rows (not grouped by patient: the loss does not
see patients) is held out of training; after training, each class's threshold on the sigmoid head is
the one that maximises F1 on those rows (`f1_thresholds`), reported in the training log and stored in
the checkpoint (`extra.multilabel_thresholds`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import RetrieveError
from retrieval.training.losses.base import Batch, LossContext, MethodLoss

ALIGN_WINDOW = 32  # steps over which distribution alignment averages the model's predictions


def fixmatch_loss(
    logits_labelled: torch.Tensor,
    labels: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float | torch.Tensor = 0.95,
    unlabelled_weight: float = 1.0,
    weak_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE(labelled) + lambda_u * mean over the unlabelled batch of 1[max p_weak >= tau] CE(strong, argmax p_weak).
    `threshold` may be one tau per class (the pseudo-label's class decides); `weak_probs` replaces
    softmax(logits_weak) (e.g. after distribution alignment)."""
    supervised = F.cross_entropy(logits_labelled, labels)
    with torch.no_grad():
        p = torch.softmax(logits_weak, dim=1) if weak_probs is None else weak_probs
        conf, pseudo = p.max(1)
        tau = threshold[pseudo] if isinstance(threshold, torch.Tensor) else threshold
        mask = (conf >= tau).float()
    unsupervised = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
    return supervised + unlabelled_weight * unsupervised


def align_distribution(p: torch.Tensor, p_model: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment: p * p_target / p_model, each row renormalised to sum 1."""
    q = p * (p_target / p_model.clamp_min(1e-6))
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


def flex_thresholds(learned: torch.Tensor, n_classes: int, tau: float) -> torch.Tensor:
    """FlexMatch's per-class thresholds: tau * M(beta_c), M(x) = x / (2 - x), beta_c = sigma_c /
    max(max_c sigma_c, unused); sigma_c counts rows whose last confident prediction was c (`learned` holds
    each row's class, -1 for never), unused counts the -1 rows (the warm-up)."""
    sigma = torch.bincount(learned[learned >= 0], minlength=n_classes).float()
    denom = max(float(sigma.max()), float((learned < 0).sum()))
    beta = sigma / denom if denom > 0 else torch.zeros(n_classes)
    return tau * beta / (2.0 - beta)


def multilabel_fixmatch_loss(
    logits_labelled: torch.Tensor,
    targets: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float = 0.95,
    unlabelled_weight: float = 1.0,
) -> torch.Tensor:
    """One-head multi-label FixMatch (paper 004): BCE(labelled) + lambda_u * mean over the unlabelled batch
    of 1[max_c p_weak >= tau] * BCE(strong, 1[p_weak >= 0.5]); BCE averaged over the classes."""
    supervised = F.binary_cross_entropy_with_logits(logits_labelled, targets)
    with torch.no_grad():
        p = torch.sigmoid(logits_weak)
        pseudo = (p >= 0.5).float()
        mask = (p.max(1).values >= threshold).float()
    per_row = F.binary_cross_entropy_with_logits(logits_strong, pseudo, reduction="none").mean(1)
    return supervised + unlabelled_weight * (per_row * mask).mean()


def f1_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per class, the threshold t (one of the class's probabilities; predict p >= t) that maximises F1 on
    these rows; the lowest such t on ties; `default` for a class without a positive row."""
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets).astype(bool)
    out = np.full(probs.shape[1], default, dtype=float)
    for c in range(probs.shape[1]):
        y = targets[:, c]
        if not y.any():
            continue
        best = -1.0
        for t in np.unique(probs[:, c]):
            pred = probs[:, c] >= t
            f1 = 2.0 * float((pred & y).sum()) / float(pred.sum() + y.sum())
            if f1 > best:
                best, out[c] = f1, float(t)
    return out


def split_label_names(classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Multi-label class names (`liver|kidney`): the single classes and a (combinations x classes) 0/1 matrix."""
    parts = [[a.strip() for a in c.split("|") if a.strip()] for c in classes]
    atoms = sorted({a for p in parts for a in p})
    matrix = np.zeros((len(classes), len(atoms)), dtype=np.float32)
    for i, p in enumerate(parts):
        matrix[i, [atoms.index(a) for a in p]] = 1.0
    return atoms, matrix


class FixMatchLoss(MethodLoss):
    needs_labels = False  # some labels are needed, not all: checked here
    combo_targets: torch.Tensor  # buffers (registered where the option asks for them)
    thresholds: torch.Tensor
    p_target: torch.Tensor
    p_history: torch.Tensor
    learned: torch.Tensor

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.labelled = np.flatnonzero(ctx.codes >= 0)
        if not len(self.labelled):
            raise RetrieveError(
                f"--method fixmatch needs some labelled images (an empty label marks an unlabelled one); "
                f"none of the {len(ctx.codes)} has a label"
            )
        if ctx.n_classes < 2:
            raise RetrieveError("--method fixmatch needs labelled images of at least two classes")
        self.threshold, self.weight, self.mu = cfg.fixmatch_threshold, cfg.unlabelled_weight, cfg.unlabelled_ratio
        self.codes = torch.as_tensor(ctx.codes)
        self.gen = ctx.gen
        self.clean_features = ctx.clean_features
        names = ctx.classes if ctx.classes is not None else [str(i) for i in range(ctx.n_classes)]
        self.multilabel = any("|" in c for c in names)
        self.mode = cfg.fixmatch_multilabel if self.multilabel else "single"
        self.val_rows = np.zeros(0, dtype=np.int64)
        if self.multilabel:
            self.atoms, matrix = split_label_names(names)
            self.register_buffer("combo_targets", torch.as_tensor(matrix))
            n_val = int(round(cfg.fixmatch_val_fraction * len(self.labelled)))
            if n_val < 1 or n_val >= len(self.labelled):
                raise RetrieveError(
                    f"--method fixmatch on multi-label rows: fixmatch_val_fraction {cfg.fixmatch_val_fraction} of "
                    f"{len(self.labelled)} labelled images leaves no validation or no training rows"
                )
            order = np.random.default_rng(cfg.seed).permutation(self.labelled)
            self.val_rows, self.labelled = np.sort(order[:n_val]), np.sort(order[n_val:])
            self.register_buffer("thresholds", torch.full((len(self.atoms),), 0.5))
        head_out = len(self.atoms) if self.mode == "one-head" else ctx.n_classes
        self.classifier = nn.Linear(ctx.encoder.dim, head_out)
        if self.mode == "two-head":
            self.multilabel_head = nn.Linear(ctx.encoder.dim, len(self.atoms))
        self.align, self.flex = cfg.fixmatch_align, cfg.fixmatch_thresholds == "flex"
        if self.mode == "one-head" and (self.align or self.flex):
            raise RetrieveError("fixmatch_align and fixmatch_thresholds: flex need a softmax head, not one-head")
        if self.align:
            freq = np.bincount(ctx.codes[self.labelled], minlength=ctx.n_classes).astype(np.float32)
            self.register_buffer("p_target", torch.as_tensor(freq / freq.sum()))
            self.register_buffer("p_history", torch.full((ALIGN_WINDOW, ctx.n_classes), 1.0 / ctx.n_classes))
            self.align_step = 0
        if self.flex:
            self.register_buffer("learned", torch.full((len(ctx.codes),), -1, dtype=torch.long))
        self.pass_rate: list[float] = []  # share of the unlabelled batch above its threshold, per step

    def _unlabelled_rows(self, idx: np.ndarray) -> np.ndarray:
        return idx[~np.isin(idx, self.val_rows)] if len(self.val_rows) else idx

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.clean is None:
            raise RetrieveError("fixmatch needs the un-augmented view of each image")
        rows = self._unlabelled_rows(batch.idx)
        n_lab = max(1, math.ceil(len(batch.idx) / self.mu))
        pick = self.labelled[torch.randint(len(self.labelled), (n_lab,), generator=self.gen).numpy()]
        z_lab = batch.embed(pick)
        y = self.codes[pick].to(z_lab.device)
        if not len(rows):  # every row of this batch is a validation row: the labelled term alone
            rows = pick
        with torch.no_grad():
            logits_weak = self.classifier(batch.project(batch.clean(rows)))
        logits_strong = self.classifier(batch.embed(rows))
        if self.mode == "one-head":
            with torch.no_grad():
                self.pass_rate.append(
                    float((torch.sigmoid(logits_weak).max(1).values >= self.threshold).float().mean())
                )
            targets = self.combo_targets[y]
            return multilabel_fixmatch_loss(
                self.classifier(z_lab), targets, logits_weak, logits_strong, self.threshold, self.weight
            )
        threshold, weak_probs = self._thresholds_and_probs(logits_weak, rows)
        loss = fixmatch_loss(self.classifier(z_lab), y, logits_weak, logits_strong, threshold, self.weight, weak_probs)
        if self.mode == "two-head":
            loss = loss + F.binary_cross_entropy_with_logits(self.multilabel_head(z_lab), self.combo_targets[y])
        return loss

    @torch.no_grad()
    def _thresholds_and_probs(
        self, logits_weak: torch.Tensor, rows: np.ndarray
    ) -> tuple[float | torch.Tensor, torch.Tensor]:
        p = torch.softmax(logits_weak, dim=1)
        if self.align:
            self.p_history[self.align_step % ALIGN_WINDOW] = p.mean(0)
            self.align_step += 1
            p = align_distribution(p, self.p_history[: min(self.align_step, ALIGN_WINDOW)].mean(0), self.p_target)
        threshold: float | torch.Tensor = self.threshold
        conf, pseudo = p.max(1)
        if self.flex:
            idx = torch.as_tensor(rows, device=self.learned.device)
            over = conf > self.threshold
            self.learned[idx[over]] = pseudo[over]
            threshold = flex_thresholds(self.learned, p.shape[1], self.threshold).to(p.device)
            self.pass_rate.append(float((conf >= threshold[pseudo]).float().mean()))
        else:
            self.pass_rate.append(float((conf >= self.threshold).float().mean()))
        return threshold, p

    @torch.no_grad()
    def finish(self, project: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """After training: the share of unlabelled rows that passed the threshold, and for multi-label rows
        each class's F1-maximising threshold on the held-out validation rows."""
        rates = self.pass_rate
        out: dict[str, Any] = {
            "pseudo_label_rate_first_epoch_steps": round(float(np.mean(rates[:10])), 4) if rates else None,
            "pseudo_label_rate_last_steps": round(float(np.mean(rates[-10:])), 4) if rates else None,
        }
        if not self.multilabel:
            return out
        if self.clean_features is None:
            raise RetrieveError("fixmatch on multi-label rows needs the un-augmented features to pick thresholds")
        z = project(self.clean_features()[torch.as_tensor(self.val_rows).to(self.combo_targets.device)])
        head = self.classifier if self.mode == "one-head" else self.multilabel_head
        probs = torch.sigmoid(head(z)).cpu().numpy()
        targets = self.combo_targets[self.codes[self.val_rows]].cpu().numpy()
        self.thresholds.copy_(torch.as_tensor(f1_thresholds(probs, targets), dtype=torch.float32))
        out["multilabel"] = {
            "mode": self.mode,
            "classes": self.atoms,
            "thresholds": [round(float(t), 4) for t in self.thresholds],
            "validation_rows": len(self.val_rows),
        }
        return out

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        if not self.multilabel:
            return {}
        head = self.classifier if self.mode == "one-head" else self.multilabel_head
        return {
            "multilabel_thresholds": self.thresholds,
            "multilabel_head.weight": head.weight,
            "multilabel_head.bias": head.bias,
        }
