"""Shared parts of the deep-clustering losses (paper 004, M6): softmax cluster heads on the encoder's
unit vector, the PUI cross-entropy over cluster columns, and the cluster-size priors of PICA and LSD."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.training.losses.base import Batch, LossContext, MethodLoss

EPS = 1e-8


class ClusterHead(nn.Module):
    """Softmax over K clusters from the L2-normalised vector the index stores: p = softmax(W v / T).

    Working on the stored vector means an index's vectors are enough to assign clusters later."""

    def __init__(self, in_dim: int, clusters: int, temperature: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(in_dim, clusters)
        self.temperature = temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.linear(F.normalize(z, dim=1)) / self.temperature, dim=1)


def pui_matrix(p_hat: torch.Tensor, p_tilde: torch.Tensor) -> torch.Tensor:
    """M(j1, j2) = cos(q^_j1, q~_j2), q_j the j-th cluster column (N values) of P (N, K)."""
    return F.normalize(p_hat.T, dim=1, eps=EPS) @ F.normalize(p_tilde.T, dim=1, eps=EPS).T


def pui_cross_entropy(p_hat: torch.Tensor, p_tilde: torch.Tensor) -> torch.Tensor:
    """L_CE = (1/K) sum_j -log softmax_row(M)_jj: each cluster column agrees across views, differs from others."""
    m = pui_matrix(p_hat, p_tilde)
    return F.cross_entropy(m, torch.arange(m.shape[0], device=m.device))


def cluster_sizes(p: torch.Tensor) -> torch.Tensor:
    """Z: the column mass of P, normalised to sum 1."""
    mass = p.sum(0)
    return mass / mass.sum()


def negative_entropy(p: torch.Tensor) -> torch.Tensor:
    """PICA's L_NE = log K - H(Z): 0 when the batch spreads evenly over the clusters."""
    z = cluster_sizes(p)
    return math.log(p.shape[1]) + (z * torch.log(z + EPS)).sum()


def dirichlet_prior(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """LSD's L_SD = -(1 / log K) sum_k (alpha - 1) log z_k: the negative log-likelihood (up to a constant)
    of Z under a symmetric Dirichlet(alpha); alpha slightly above 1 allows unequal cluster sizes."""
    z = cluster_sizes(p)
    return -(alpha - 1) * torch.log(z + EPS).sum() / math.log(p.shape[1])


class ClusterLoss(MethodLoss):
    """Base of the clustering methods: a K-cluster head and, optionally, an over-clustering head
    (K_over > K) trained jointly with the same loss. No labels are read."""

    needs_labels = False

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.clusters, self.weight = cfg.clusters, cfg.cluster_weight
        self.cluster = ClusterHead(ctx.encoder.dim, cfg.clusters, cfg.cluster_temperature)
        self.overcluster = (
            ClusterHead(ctx.encoder.dim, cfg.overclusters, cfg.cluster_temperature) if cfg.overclusters else None
        )

    def heads(self) -> list[ClusterHead]:
        return [self.cluster] + ([self.overcluster] if self.overcluster is not None else [])

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"cluster.{k}": v for k, v in self.cluster.linear.state_dict().items()}
        if self.overcluster is not None:
            out.update({f"overcluster.{k}": v for k, v in self.overcluster.linear.state_dict().items()})
        return out


class PUIClusterLoss(ClusterLoss):
    """Two augmented views; L = L_CE(PUI) + lambda * prior(Z) per head, summed over heads."""

    def prior(self, p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - PICA and LSD define it
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        z_tilde = batch.embed()
        z_hat = batch.embed()
        loss = z_tilde.new_zeros(())
        for head in self.heads():
            p_tilde, p_hat = head(z_tilde), head(z_hat)
            loss = loss + pui_cross_entropy(p_hat, p_tilde) + self.weight * self.prior(p_tilde)
        return loss
