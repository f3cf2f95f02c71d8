"""`supcon`: supervised contrastive loss (Khosla et al. 2020, L_out) over two views per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval.training.losses.base import Batch, LossContext, MethodLoss


def supcon_loss(views: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Views (N, V, D); positives = same label. Anchors without a positive are left out of the mean, and
    a batch without a negative pair (one label throughout) gives 0, as in pytorch-metric-learning."""
    n, v, _ = views.shape
    z = F.normalize(views.reshape(n * v, -1), dim=1)
    lab = labels.repeat_interleave(v)
    logits = z @ z.T / temperature
    self_mask = torch.eye(n * v, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    same = lab[:, None] == lab[None, :]
    pos = same & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any() or same.all():
        return views.sum() * 0.0
    mean_log_prob_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)[has] / n_pos[has]
    return -mean_log_prob_pos.mean()


class SupConLoss(MethodLoss):
    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        self.temperature = ctx.cfg.temperature

    def forward(self, batch: Batch) -> torch.Tensor:
        z1 = batch.embed()
        views = torch.stack([z1, batch.embed()], dim=1)
        return supcon_loss(views, batch.labels, self.temperature)
