"""Losses as small classes in a registry (pytorch-metric-learning style). Settings: METHODS.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str):
    def deco(cls):
        LOSSES[name] = cls
        return cls

    return deco


@register_loss("contrastive")
class ContrastiveLoss(nn.Module):
    """Hadsell et al. 2006 (paper 003): D = ||a - b||_2; same: D^2 / 2; different: max(0, m - D)^2 / 2."""

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        d = torch.linalg.vector_norm(a - b, dim=1)
        same = same.float()
        return (same * 0.5 * d.pow(2) + (1 - same) * 0.5 * F.relu(self.margin - d).pow(2)).mean()


@register_loss("siamese-l1")
class SiameseL1Loss(nn.Module):
    """Paper 000 as written: x = sqrt(||a - b||_1); L = y x + (1 - y) max(margin - x, 0), y = 1 similar.

    Plus binary cross-entropy on the similarity head's logit (sigmoid(dense(|a - b|))), which is how
    that head learns to score pairs for n-shot classification.
    """

    def __init__(self, margin: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.bce_weight = bce_weight

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, logit: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = same.float()
        x = torch.sqrt(torch.sum(torch.abs(a - b), dim=1) + 1e-8)
        loss = (y * x + (1 - y) * F.relu(self.margin - x)).mean()
        if logit is not None and self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logit, y)
        return loss


@register_loss("ntxent")
class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (paper 001): 2N views, cosine similarity / tau, positives = the other view."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        n = z1.shape[0]
        sim = z @ z.T / self.temperature
        sim.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)


@register_loss("supcon")
class SupConLoss(nn.Module):
    """Supervised contrastive (Khosla et al. 2020, L_out), positives = same (weak) label in the batch.

    Views: (N, V, D). Anchors without a positive are left out of the mean.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, views: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, v, _ = views.shape
        z = F.normalize(views.reshape(n * v, -1), dim=1)
        lab = labels.repeat_interleave(v)
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(n * v, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (lab[:, None] == lab[None, :]) & ~self_mask
        n_pos = pos.sum(1)
        has = n_pos > 0
        if not has.any():
            return views.sum() * 0.0
        mean_log_prob_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)[has] / n_pos[has]
        return -mean_log_prob_pos.mean()


@register_loss("weak-simclr")
class WeakSimCLRLoss(nn.Module):
    """Paper 001: L = beta * CE(weak label) + (1 - beta) * NT-Xent; beta = 0 is SimCLR, 1 supervised."""

    def __init__(self, beta: float = 0.5, temperature: float = 0.1):
        super().__init__()
        self.beta = beta
        self.ntxent = NTXentLoss(temperature)

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, class_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self.beta * F.cross_entropy(class_logits, labels) + (1 - self.beta) * self.ntxent(z1, z2)
