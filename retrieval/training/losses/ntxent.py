"""`simclr`: SimCLR's NT-Xent (paper 001) between two augmented views; no labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval.training.losses.base import Batch, LossContext, MethodLoss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """2N views, cosine similarity / tau, the positive of each view is the other view of its image."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class NTXentLoss(MethodLoss):
    needs_labels = False

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.temperature = ctx.cfg.temperature

    def forward(self, batch: Batch) -> torch.Tensor:
        z1 = batch.embed()
        return nt_xent(z1, batch.embed(), self.temperature)
