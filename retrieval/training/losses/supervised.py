"""`supervised`: cross-entropy of a linear classifier on the projection (the head's output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import RetrieveError
from retrieval.training.losses.base import Batch, LossContext, MethodLoss


class SupervisedLoss(MethodLoss):
    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        if ctx.n_classes < 2:
            raise RetrieveError("supervised training needs at least two classes")
        self.classifier = nn.Linear(ctx.encoder.dim, ctx.n_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.classifier(batch.embed()), batch.labels)
