"""`siamese-l1`: paper 000's Siamese loss on sqrt(L1) distances, plus BCE on a pair-similarity head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.training.losses.base import Batch, LossContext, MethodLoss
from retrieval.training.losses.pairs import PairSampler


def siamese_l1_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    same: torch.Tensor,
    margin: float = 1.0,
    logit: torch.Tensor | None = None,
    bce_weight: float = 1.0,
) -> torch.Tensor:
    """x = sqrt(||a - b||_1); L = y x + (1 - y) max(margin - x, 0), y = 1 similar; plus BCE on `logit`."""
    y = same.float()
    x = torch.sqrt(torch.sum(torch.abs(a - b), dim=1) + 1e-8)
    loss = (y * x + (1 - y) * F.relu(margin - x)).mean()
    if logit is not None and bce_weight:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logit, y)
    return loss


class SiameseL1Loss(MethodLoss):
    """The similarity head sigmoid(dense(|a - b|)) learns to score pairs for n-shot classification."""

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.margin = ctx.cfg.margin
        self.pairs = PairSampler(ctx.codes, ctx.pairs, ctx.gen)
        self.similarity = nn.Linear(ctx.encoder.dim, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        a, b, same = self.pairs.sample(batch.idx)
        ea, eb = F.normalize(batch.embed(a), dim=1), F.normalize(batch.embed(b), dim=1)
        logit = self.similarity(torch.abs(ea - eb)).squeeze(1)
        return siamese_l1_loss(ea, eb, torch.as_tensor(same, device=ea.device), self.margin, logit)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"similarity.{k}": v for k, v in self.similarity.state_dict().items()}
