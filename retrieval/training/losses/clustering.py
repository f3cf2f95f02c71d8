"""Shared parts of the deep-clustering losses (paper 004, M6): softmax cluster heads on the encoder's
unit vector, the PUI cross-entropy over cluster columns, and the cluster-size priors of PICA and LSD."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.training.losses.base import Batch, LossContext, MethodLoss
from retrieval.training.losses.selflabel import self_label_loss

EPS = 1e-8


class ClusterHead(nn.Module):
    """Softmax over K clusters from the L2-normalised vector the index stores: p = softmax(W v / T).

    Working on the stored vector means an index's vectors are enough to assign clusters later."""

    def __init__(self, in_dim: int, clusters: int, temperature: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(in_dim, clusters)
        self.temperature = temperature

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(z, dim=1)) / self.temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(z), dim=1)

    @torch.no_grad()
    def init_from_kmeans(self, z: torch.Tensor, seed: int, spread: float = 5.0, max_norm: float = 1.0) -> None:
        """Start from k-means: scikit-learn KMeans (10 restarts) on the unit vectors `z`, centres c_k. The
        logits s (u . c_k - |c_k|^2 / 2) / T rank the clusters as the squared distances |u - c_k|^2 do, so
        the head's argmax is k-means' own assignment; s scales them to a spread (std of a row's logits about
        their mean, over the rows) of `spread`, but no weight row longer than `max_norm`: where the vectors
        crowd into a narrow cone (a random projection's do) a sharp start collapses at the first step, as the
        projection under the head moves every vector at once, so there the head starts soft."""
        from sklearn.cluster import KMeans

        unit = F.normalize(z.float(), dim=1).cpu()
        km = KMeans(n_clusters=self.linear.out_features, n_init=10, random_state=seed).fit(unit.numpy())
        centres = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)
        bias = -0.5 * (centres**2).sum(1)
        scores = unit @ centres.T + bias
        std = float((scores - scores.mean(1, keepdim=True)).std())
        scale = min(self.temperature * spread / max(std, 1e-12), max_norm / float(centres.norm(dim=1).max()))
        self.linear.weight.copy_((scale * centres).to(self.linear.weight.device))
        self.linear.bias.copy_((scale * bias).to(self.linear.bias.device))


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
    (K_over > K) trained jointly with the same loss. No labels are read.

    `cluster_init: kmeans` starts each head from k-means on the initial vectors of the clean training
    images. With `self_label_epochs` E > 0 the last E of the run's epochs are SCAN's self-labelling step
    on the K head (`selflabel.self_label_loss`) instead of the method's own loss."""

    needs_labels = False

    def __init__(self, ctx: LossContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.clusters, self.weight = cfg.clusters, cfg.cluster_weight
        self.cluster = ClusterHead(ctx.encoder.dim, cfg.clusters, cfg.cluster_temperature)
        self.overcluster = (
            ClusterHead(ctx.encoder.dim, cfg.overclusters, cfg.cluster_temperature) if cfg.overclusters else None
        )
        if cfg.cluster_init == "kmeans":
            if ctx.clean_features is None:
                raise ValueError("cluster_init kmeans needs the clean features of the training images")
            with torch.no_grad():
                z = ctx.encoder.head(ctx.clean_features())
            for head in self.heads():
                head.init_from_kmeans(z, cfg.seed)
        steps_per_epoch = max(1, math.ceil(len(ctx.codes) / cfg.batch_size))
        self.self_label_from = (cfg.epochs - cfg.self_label_epochs) * steps_per_epoch if cfg.self_label_epochs else None
        self.self_label_threshold = cfg.self_label_threshold
        self.steps_seen = 0
        self.confident: list[int] = []  # confident rows per self-labelling step (how many pseudo-labels it had)

    def heads(self) -> list[ClusterHead]:
        return [self.cluster] + ([self.overcluster] if self.overcluster is not None else [])

    def forward(self, batch: Batch) -> torch.Tensor:
        if self.training:
            self.steps_seen += 1
        if self.self_label_from is not None and self.steps_seen > self.self_label_from:
            return self.self_label(batch)
        return self.cluster_loss(batch)

    def cluster_loss(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - every method defines it
        raise NotImplementedError

    def self_label(self, batch: Batch) -> torch.Tensor:
        """SCAN's self-labelling on the K head: weak view = the clean rows, strong view = an augmented one."""
        if batch.clean is None:
            raise ValueError("self-labelling needs the clean (weak) view of the batch")
        with torch.no_grad():
            weak = self.cluster.logits(batch.project(batch.clean(batch.idx)))
        loss, n = self_label_loss(weak, self.cluster.logits(batch.embed()), self.self_label_threshold)
        self.confident.append(n)
        return loss

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"cluster.{k}": v for k, v in self.cluster.linear.state_dict().items()}
        if self.overcluster is not None:
            out.update({f"overcluster.{k}": v for k, v in self.overcluster.linear.state_dict().items()})
        return out


class PUIClusterLoss(ClusterLoss):
    """Two augmented views; L = L_CE(PUI) + lambda * prior(Z) per head, summed over heads."""

    def prior(self, p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - PICA and LSD define it
        raise NotImplementedError

    def cluster_loss(self, batch: Batch) -> torch.Tensor:
        z_tilde = batch.embed()
        z_hat = batch.embed()
        loss = z_tilde.new_zeros(())
        for head in self.heads():
            p_tilde, p_hat = head(z_tilde), head(z_hat)
            loss = loss + pui_cross_entropy(p_hat, p_tilde) + self.weight * self.prior(p_tilde)
        return loss
