"""`pica`: PICA (Huang et al. 2020, paper 004): PUI cross-entropy + lambda * (log K - H(Z))."""

from __future__ import annotations

import torch

from retrieval.training.losses.clustering import PUIClusterLoss, negative_entropy


class PICALoss(PUIClusterLoss):
    def prior(self, p: torch.Tensor) -> torch.Tensor:
        return negative_entropy(p)
