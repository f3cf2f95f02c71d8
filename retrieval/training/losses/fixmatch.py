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

Options for wrong confident pseudo-labels (run 18: after training 73-85% of the unlabelled rows pass tau,
but only 65-82% of those are right); both act on a softmax head only:
- `fixmatch_pseudo_groups: true`: patient-consistent pseudo-labels. An unlabelled row's weak-view
  probabilities are replaced by the mean of the weak-view probabilities of the unlabelled rows of its group
  (`LossContext.groups`: patient and near-duplicate group, `folds.group_ids`, as the benchmark's folds),
  itself included, under the current head, before alignment and thresholds. Labelled rows of the group are
  not used (no label is assumed to be patient-level); a labelled row keeps its own probabilities. A training
  step averages over at most `GROUP_MEMBERS` (16) unlabelled rows of a group: the batch's own rows of that group
  (all of them, also beyond 16) and others drawn with the run's generator up to 16 (a group of <= 16 uses every
  row, as without the cap); after training (`pseudo_labels`) every row of the group counts. The clean views go
  through the head `FORWARD_CHUNK` (256) at a time, so a long cine series or an end-to-end backbone stays within
  memory. The option needs groups: with no group of two or more unlabelled rows (a plain folder, where every
  image is its own group) it is an error, never a silent plain FixMatch.
- `fixmatch_propagation: agree`: neighbour-consistent pseudo-labels. Label propagation (Zhou et al. 2004) as
  Iscen et al. (CVPR 2019) use it: kNN graph on the L2-normalised clean features of the training rows,
  k = 50, affinities max(0, cos)^3, W = A + A^T, symmetric normalisation, (I - 0.99 W_n) Z = Y solved by
  conjugate gradient once per training run (frozen features; with an end-to-end backbone, its features
  before training), Y_ic = 1 / |labelled rows of class c|. A pseudo-label counts only where it equals the
  row's propagated label argmax_c Z_ic (a labelled row's own label; a row without propagated mass never
  agrees). k = 50 rather than 10: with 10 ROIs per patient (byra) a row's 10 nearest neighbours are mostly
  its own patient's, and unlabelled patients would have no path to a labelled one.

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

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.sparse.linalg import cg
from torch import nn

from retrieval.errors import RetrieveError
from retrieval.training.losses.base import Batch, LossContext, MethodLoss

ALIGN_WINDOW = 32  # steps over which distribution alignment averages the model's predictions
PROPAGATION_K, PROPAGATION_POWER, PROPAGATION_ALPHA = 50, 3.0, 0.99  # Iscen et al. 2019
GROUP_MEMBERS = 16  # fixmatch_pseudo_groups: at most this many rows of a group in a training step's group mean
FORWARD_CHUNK = 256  # clean views per forward pass when a step's group members go through the head

log = logging.getLogger(__name__)


def pseudo_label_mask(
    p: torch.Tensor, threshold: float | torch.Tensor = 0.95, propagated: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's pseudo-label argmax p and its 0/1 mask: max p >= tau (one tau per class when `threshold` is a
    tensor: the pseudo-label's class decides), and, given `propagated` labels, the pseudo-label equals it."""
    conf, pseudo = p.max(1)
    tau = threshold[pseudo] if isinstance(threshold, torch.Tensor) else threshold
    mask = conf >= tau
    if propagated is not None:
        mask = mask & (pseudo == propagated)
    return pseudo, mask.float()


def fixmatch_loss(
    logits_labelled: torch.Tensor,
    labels: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float | torch.Tensor = 0.95,
    unlabelled_weight: float = 1.0,
    weak_probs: torch.Tensor | None = None,
    propagated: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE(labelled) + lambda_u * mean over the unlabelled batch of 1[max p_weak >= tau] CE(strong, argmax p_weak).
    `threshold` may be one tau per class (the pseudo-label's class decides); `weak_probs` replaces
    softmax(logits_weak) (e.g. after distribution alignment or a group mean); given `propagated` labels, a
    pseudo-label also has to equal its row's propagated label."""
    supervised = F.cross_entropy(logits_labelled, labels)
    with torch.no_grad():
        p = torch.softmax(logits_weak, dim=1) if weak_probs is None else weak_probs
        pseudo, mask = pseudo_label_mask(p, threshold, propagated)
    unsupervised = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
    return supervised + unlabelled_weight * unsupervised


def align_distribution(p: torch.Tensor, p_model: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment: p * p_target / p_model, each row renormalised to sum 1."""
    q = p * (p_target / p_model.clamp_min(1e-6))
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


def group_mean(p: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """(n_slots, C): the mean of the rows of `p` that share each slot (`slot[i]` is row i's slot)."""
    total = torch.zeros(n_slots, p.shape[1], dtype=p.dtype, device=p.device).index_add_(0, slot, p)
    count = torch.bincount(slot, minlength=n_slots).clamp_min(1).to(p.dtype)
    return total / count[:, None]


def knn_affinity(x: np.ndarray, k: int, power: float, chunk: int = 1024) -> sparse.csr_matrix:
    """Iscen et al.'s graph: rows L2-normalised, a_ij = max(0, cos_ij)^power for the k nearest neighbours j
    of i (self excluded; k capped at N - 1), W = A + A^T (sparse, symmetric)."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    k = min(k, n - 1)
    rows, cols, vals = [], [], []
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.T
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        rows.append(np.repeat(np.arange(s, s + len(sim)), k))
        cols.append(nn_idx.ravel())
        vals.append(np.maximum(np.take_along_axis(sim, nn_idx, 1).ravel(), 0.0) ** power)
    a = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return (a + a.T).tocsr()


def propagate_labels(
    features: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    k: int = PROPAGATION_K,
    power: float = PROPAGATION_POWER,
    alpha: float = PROPAGATION_ALPHA,
) -> np.ndarray:
    """Label propagation (Zhou et al. 2004; Iscen et al. 2019): Z (N, C) solving (I - alpha W_n) Z = Y by
    conjugate gradient, W_n = D^-1/2 W D^-1/2 of `knn_affinity`, Y_ic = 1 / |{j: codes_j = c}| where codes_i = c
    (-1: unlabelled), negative entries clipped to 0."""
    w = knn_affinity(features, k, power)
    d = np.asarray(w.sum(1)).ravel()
    d_inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    lap = sparse.identity(len(d), format="csr") - alpha * (sparse.diags(d_inv) @ w @ sparse.diags(d_inv))
    z = np.zeros((len(d), n_classes))
    for c in range(n_classes):
        y = (codes == c).astype(np.float64)
        if not y.any():
            continue
        y /= y.sum()
        try:
            z[:, c], info = cg(lap, y, rtol=1e-10, atol=0.0, maxiter=10 * len(d))
        except TypeError:  # scipy < 1.12 calls the relative tolerance `tol`
            z[:, c], info = cg(lap, y, tol=1e-10, atol=0.0, maxiter=10 * len(d))
        if info:
            log.warning("label propagation: conjugate gradient did not converge for class %d (%d)", c, info)
    return np.maximum(z, 0.0)


def propagated_labels(z: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """A row's propagated label: its own label where it has one, else argmax_c Z_ic, -1 where Z_i is all 0."""
    out = np.where(z.sum(1) > 0, z.argmax(1), -1)
    return np.where(codes >= 0, codes, out)


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
    prop_label: torch.Tensor

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
        if self.mode == "one-head" and (cfg.fixmatch_pseudo_groups or cfg.fixmatch_propagation != "none"):
            raise RetrieveError("fixmatch_pseudo_groups and fixmatch_propagation need a softmax head, not one-head")
        self.group_of: np.ndarray | None = None
        self.max_members = GROUP_MEMBERS
        if cfg.fixmatch_pseudo_groups:
            if ctx.groups is None:
                raise RetrieveError(
                    "fixmatch_pseudo_groups needs a patient_id or near_dup_group column in the training rows"
                )
            # an unlabelled row's slot is its group; a labelled (or validation) row has a slot of its own
            unlabelled = ctx.codes < 0
            own = np.asarray(ctx.groups).max() + 1 + np.arange(len(ctx.codes))
            _, self.group_of = np.unique(np.where(unlabelled, ctx.groups, own), return_inverse=True)
            order = np.argsort(self.group_of, kind="stable")
            self.members = np.split(order, np.cumsum(np.bincount(self.group_of))[:-1])
            if max(len(m) for m in self.members) < 2:  # every unlabelled row alone: plain FixMatch in disguise
                raise RetrieveError(
                    f"fixmatch_pseudo_groups: no patient or near-duplicate group holds two or more of the "
                    f"{int(unlabelled.sum())} unlabelled images; the option needs patient ids (a patient_id or "
                    f"near_dup_group column shared by several unlabelled images)"
                )
        self.propagation: np.ndarray | None = None
        if cfg.fixmatch_propagation == "agree":
            if ctx.clean_features is None:
                raise RetrieveError("fixmatch_propagation needs the un-augmented features of the training rows")
            seen = ctx.codes.copy()
            seen[self.val_rows] = -1  # validation rows' labels are not seen in training
            self.propagation = propagate_labels(ctx.clean_features().float().cpu().numpy(), seen, ctx.n_classes)
            self.register_buffer(
                "prop_label", torch.as_tensor(propagated_labels(self.propagation, seen)), persistent=False
            )

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
            if self.mode != "one-head":
                weak_probs = self._weak_probs(rows, logits_weak, batch.project, batch.clean)
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
        threshold, weak_probs = self._thresholds_and_probs(weak_probs, rows)
        propagated = (
            self.prop_label[torch.as_tensor(rows, device=self.prop_label.device)]
            if self.propagation is not None
            else None
        )
        self.pass_rate.append(float(pseudo_label_mask(weak_probs, threshold, propagated)[1].mean()))
        loss = fixmatch_loss(
            self.classifier(z_lab), y, logits_weak, logits_strong, threshold, self.weight, weak_probs, propagated
        )
        if self.mode == "two-head":
            loss = loss + F.binary_cross_entropy_with_logits(self.multilabel_head(z_lab), self.combo_targets[y])
        return loss

    @torch.no_grad()
    def _weak_probs(
        self,
        rows: np.ndarray,
        logits_weak: torch.Tensor,
        project: Callable[[torch.Tensor], torch.Tensor],
        clean_rows: Callable[[np.ndarray], torch.Tensor],
        cap: bool = True,
    ) -> torch.Tensor:
        """softmax of the weak view; with `fixmatch_pseudo_groups`, the mean over each row's slot (the unlabelled
        rows of its group; a labelled row alone), every member's clean view under the current head. With `cap`,
        a slot larger than `max_members` averages its rows in `rows` and others drawn with the run's generator
        up to `max_members` in all (`sampled_members`); the views go through the head `FORWARD_CHUNK` at a time."""
        if self.group_of is None:
            return torch.softmax(logits_weak, dim=1)
        slots, inverse = np.unique(self.group_of[rows], return_inverse=True)
        parts = [self.sampled_members(g, rows) if cap else self.members[g] for g in slots]
        members = np.concatenate(parts)
        member_slot = np.repeat(np.arange(len(slots)), [len(m) for m in parts])
        chunks = np.array_split(members, math.ceil(len(members) / FORWARD_CHUNK))  # near-equal sizes
        p = torch.softmax(torch.cat([self.classifier(project(clean_rows(c))) for c in chunks]), dim=1)
        mean = group_mean(p, torch.as_tensor(member_slot, device=p.device), len(slots))
        return mean[torch.as_tensor(inverse, device=p.device)]

    def sampled_members(self, slot: int, rows: np.ndarray) -> np.ndarray:
        """The rows of `slot` a training step averages: all of them when there are at most `max_members`; else
        the slot's rows among `rows` (the batch) and others drawn with the run's generator, `max_members` in all
        (the batch's own rows all count, also when there are more of them)."""
        members = self.members[slot]
        if len(members) <= self.max_members:
            return members
        assert self.group_of is not None  # set with the members
        here = np.unique(rows[self.group_of[rows] == slot])
        if len(here) >= self.max_members:
            return here
        rest = members[~np.isin(members, here)]
        draw = torch.randperm(len(rest), generator=self.gen)[: self.max_members - len(here)].numpy()
        return np.concatenate([here, rest[draw]])

    @torch.no_grad()
    def _thresholds_and_probs(
        self, p: torch.Tensor, rows: np.ndarray, update: bool = True
    ) -> tuple[float | torch.Tensor, torch.Tensor]:
        """The weak view's probabilities after alignment and the thresholds (one per class under flex);
        `update` moves the alignment history and FlexMatch's learned classes (training steps)."""
        if self.align:
            if update:
                self.p_history[self.align_step % ALIGN_WINDOW] = p.mean(0)
                self.align_step += 1
            p = align_distribution(
                p, self.p_history[: max(1, min(self.align_step, ALIGN_WINDOW))].mean(0), self.p_target
            )
        threshold: float | torch.Tensor = self.threshold
        if self.flex:
            conf, pseudo = p.max(1)
            if update:
                idx = torch.as_tensor(rows, device=self.learned.device)
                over = conf > self.threshold
                self.learned[idx[over]] = pseudo[over]
            threshold = flex_thresholds(self.learned, p.shape[1], self.threshold).to(p.device)
        return threshold, p

    @torch.no_grad()
    def pseudo_labels(
        self, project: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """After training, on the clean `features` of every training row: the rows (validation rows left
        out), their pseudo-labels and whether each passes, with every option as in training."""
        if self.mode == "one-head":
            raise RetrieveError("pseudo_labels: a softmax head is needed, not one-head")
        rows = self._unlabelled_rows(np.arange(len(self.codes)))
        dev = self.classifier.weight.device

        def clean_rows(r: np.ndarray) -> torch.Tensor:
            return features[torch.as_tensor(r)].to(dev)

        p = self._weak_probs(rows, self.classifier(project(clean_rows(rows))), project, clean_rows, cap=False)
        threshold, p = self._thresholds_and_probs(p, rows, update=False)
        propagated = (
            self.prop_label[torch.as_tensor(rows, device=self.prop_label.device)]
            if self.propagation is not None
            else None
        )
        pseudo, mask = pseudo_label_mask(p, threshold, propagated)
        return rows, pseudo.cpu().numpy(), mask.cpu().numpy().astype(bool)

    @torch.no_grad()
    def finish(self, project: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """After training: the share of unlabelled rows that passed the threshold, and for multi-label rows
        each class's F1-maximising threshold on the held-out validation rows."""
        rates = self.pass_rate
        out: dict[str, Any] = {
            "pseudo_label_rate_first_epoch_steps": round(float(np.mean(rates[:10])), 4) if rates else None,
            "pseudo_label_rate_last_steps": round(float(np.mean(rates[-10:])), 4) if rates else None,
        }
        if self.mode != "one-head" and self.clean_features is not None:
            rows, _, passing = self.pseudo_labels(project, self.clean_features())
            unlabelled = self.codes.numpy()[rows] < 0
            if unlabelled.any():
                out["pseudo_label_rate_after_training"] = round(float(passing[unlabelled].mean()), 4)
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
