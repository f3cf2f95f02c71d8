"""`siamese`: the contrastive loss of Hadsell et al. 2006 (paper 003) on sampled same/different pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval.training.losses.base import Batch, LossContext, MethodLoss
from retrieval.training.losses.pairs import PairSampler


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """D = ||a - b||_2; same: D^2 / 2; different: max(0, m - D)^2 / 2; mean over pairs."""
    d = torch.linalg.vector_norm(a - b, dim=1)
    same = same.float()
    return (same * 0.5 * d.pow(2) + (1 - same) * 0.5 * F.relu(margin - d).pow(2)).mean()


class ContrastiveLoss(MethodLoss):
    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.margin = ctx.cfg.margin
        self.pairs = PairSampler(ctx.codes, ctx.pairs, ctx.gen)

    def forward(self, batch: Batch) -> torch.Tensor:
        a, b, same = self.pairs.sample(batch.idx)
        ea, eb = F.normalize(batch.embed(a), dim=1), F.normalize(batch.embed(b), dim=1)
        return contrastive_loss(ea, eb, torch.as_tensor(same, device=ea.device), self.margin)
