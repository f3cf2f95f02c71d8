"""`scan`: SCAN's clustering step (Van Gansbeke et al. 2020): an image and one of its mined nearest
neighbours should fall in the same cluster; L = -mean log <p_i, p_j> + w (log K - H(mean p)).

Neighbours (20 by default) are mined once, by cosine similarity of the backbone features of the clean
training images (the pretext features). SCAN's self-labelling step follows when `self_label_epochs` > 0
(`selflabel.py`, run by the `ClusterLoss` base: the last epochs of the run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval.training.losses.base import Batch, LossContext
from retrieval.training.losses.clustering import EPS, ClusterLoss, negative_entropy


def mine_neighbours(features: torch.Tensor, k: int, batch: int = 1024) -> torch.Tensor:
    """(N, k) indices of each row's k most cosine-similar other rows."""
    z = F.normalize(features.float(), dim=1)
    k = min(k, len(z) - 1)
    out = []
    for s in range(0, len(z), batch):
        sim = z[s : s + batch] @ z.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = float("-inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def scan_loss(p_anchor: torch.Tensor, p_neighbour: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """Consistency -mean log(p_i . p_j) plus entropy_weight * (log K - H(mean p_i))."""
    consistency = -torch.log((p_anchor * p_neighbour).sum(1) + EPS).mean()
    return consistency + entropy_weight * negative_entropy(p_anchor)


class SCANLoss(ClusterLoss):
    neighbours: torch.Tensor  # a buffer: (N, 20) indices of each training image's nearest neighbours

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        if ctx.clean_features is None:
            raise ValueError("scan needs the clean features of the training images to mine neighbours")
        self.entropy_weight = ctx.cfg.entropy_weight
        self.register_buffer("neighbours", mine_neighbours(ctx.clean_features().cpu(), ctx.cfg.neighbours))
        self.gen = ctx.gen

    def cluster_loss(self, batch: Batch) -> torch.Tensor:
        nb = self.neighbours.cpu()[torch.as_tensor(batch.idx)]
        pick = torch.randint(nb.shape[1], (len(nb),), generator=self.gen)
        partners = nb[torch.arange(len(nb)), pick].numpy()
        z_a, z_n = batch.embed(), batch.embed(partners)
        loss = z_a.new_zeros(())
        for head in self.heads():
            loss = loss + scan_loss(head(z_a), head(z_n), self.entropy_weight)
        return loss
