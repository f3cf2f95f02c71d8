"""`weak-simclr` (paper 001): L = beta * CE(weak label) + (1 - beta) * NT-Xent; beta 0 is SimCLR, 1 supervised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.training.losses.base import Batch, LossContext, MethodLoss
from retrieval.training.losses.ntxent import nt_xent


def weak_simclr_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 0.1,
) -> torch.Tensor:
    return beta * F.cross_entropy(class_logits, labels) + (1 - beta) * nt_xent(z1, z2, temperature)


class WeakSimCLRLoss(MethodLoss):
    """The weak-label head sits on f(x) (paper 001); with a frozen backbone f(x) cannot learn, so it sits on
    the projection instead, the only part the weak labels can then shape."""

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.beta, self.temperature = ctx.cfg.beta, ctx.cfg.temperature
        enc = ctx.encoder
        self.on_head = bool(enc.head_dims) and ctx.frozen
        in_dim = enc.dim if self.on_head else enc.feature_dim
        self.classifier = nn.Linear(in_dim, ctx.n_classes) if ctx.n_classes > 1 else None

    def forward(self, batch: Batch) -> torch.Tensor:
        f3 = batch.view(batch.idx)
        f3 = batch.project(f3) if self.on_head else f3
        y = batch.labels
        logits = self.classifier(f3) if self.classifier is not None else torch.zeros(len(y), 2, device=y.device)
        z1 = batch.embed()
        return weak_simclr_loss(z1, batch.embed(), logits, y, self.beta, self.temperature)
