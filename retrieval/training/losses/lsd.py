"""`lsd`: PICA with LSD's symmetric-Dirichlet cluster-size prior (paper 004, alpha = 1 + eps, lambda = 2)."""

from __future__ import annotations

import torch

from retrieval.training.losses.base import LossContext
from retrieval.training.losses.clustering import PUIClusterLoss, dirichlet_prior


class LSDLoss(PUIClusterLoss):
    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.alpha = ctx.cfg.dirichlet_alpha

    def prior(self, p: torch.Tensor) -> torch.Tensor:
        return dirichlet_prior(p, self.alpha)
