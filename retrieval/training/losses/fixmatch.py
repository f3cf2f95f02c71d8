"""`fixmatch` (Sohn et al. 2020; paper 004, M7): labelled rows train a classifier; on every row of the
batch a confident prediction (max probability >= tau) on the weak view becomes the pseudo-label that the
strong view is trained to predict. An empty label marks an unlabelled image.

Views: the weak view is the image without augmentation (with a frozen backbone, cached view 0), the
strong view one of the training augmentations (rotation, shear, zoom, crop, flip, gain, blur; no colour
changes, ultrasound-safe). Per step: the batch is the unlabelled part (mu B rows) and B = batch / mu
labelled rows are drawn beside it."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import RetrieveError
from retrieval.training.losses.base import Batch, LossContext, MethodLoss


def fixmatch_loss(
    logits_labelled: torch.Tensor,
    labels: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    threshold: float = 0.95,
    unlabelled_weight: float = 1.0,
) -> torch.Tensor:
    """CE(labelled) + lambda_u * mean over the unlabelled batch of 1[max p_weak >= tau] CE(strong, argmax p_weak)."""
    supervised = F.cross_entropy(logits_labelled, labels)
    with torch.no_grad():
        p = torch.softmax(logits_weak, dim=1)
        conf, pseudo = p.max(1)
        mask = (conf >= threshold).float()
    unsupervised = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
    return supervised + unlabelled_weight * unsupervised


class FixMatchLoss(MethodLoss):
    needs_labels = False  # some labels are needed, not all: checked here

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.labelled = np.flatnonzero(ctx.codes >= 0)
        if not len(self.labelled):
            raise RetrieveError(
                f"--method fixmatch needs some labelled images (an empty label marks an unlabelled one); "
                f"none of the {len(ctx.codes)} has a label"
            )
        if ctx.n_classes < 2:
            raise RetrieveError("--method fixmatch needs labelled images of at least two classes")
        cfg = ctx.cfg
        self.threshold, self.weight, self.mu = cfg.fixmatch_threshold, cfg.unlabelled_weight, cfg.unlabelled_ratio
        self.codes = torch.as_tensor(ctx.codes)
        self.gen = ctx.gen
        self.classifier = nn.Linear(ctx.encoder.dim, ctx.n_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.clean is None:
            raise RetrieveError("fixmatch needs the un-augmented view of each image")
        n_lab = max(1, math.ceil(len(batch.idx) / self.mu))
        pick = self.labelled[torch.randint(len(self.labelled), (n_lab,), generator=self.gen).numpy()]
        logits_lab = self.classifier(batch.embed(pick))
        with torch.no_grad():
            logits_weak = self.classifier(batch.project(batch.clean(batch.idx)))
        logits_strong = self.classifier(batch.embed())
        y = self.codes[pick].to(logits_lab.device)
        return fixmatch_loss(logits_lab, y, logits_weak, logits_strong, self.threshold, self.weight)
