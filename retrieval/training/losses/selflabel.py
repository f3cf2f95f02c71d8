"""SCAN's self-labelling step (Van Gansbeke et al. 2020), the last stage of a clustering run.

After the clustering loss has made the head confident, each image whose weak view is assigned with
probability above a threshold (0.99 in SCAN) takes that cluster as a pseudo-label, and the head learns
to give the same cluster to a strongly augmented view of it: a cross-entropy over the confident images
only, each weighted by the inverse frequency of its pseudo-label among them (class balancing, so large
clusters do not swallow small ones). The weak view's prediction is a target, not trained.

On frozen features the weak view is the clean image's feature and the strong view the feature of a
cached augmented view; end to end they are the clean image and a training augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def self_label_loss(
    logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float = 0.99, balance: bool = True
) -> tuple[torch.Tensor, int]:
    """Class-balanced cross-entropy of the strong view's logits against the weak view's argmax, over the
    rows whose weak-view softmax exceeds `threshold`; (loss, number of confident rows). With no confident
    row the loss is a zero that still belongs to the graph."""
    with torch.no_grad():
        prob = F.softmax(logits_weak.detach(), dim=1)
        confidence, target = prob.max(1)
        mask = confidence > threshold
    n = int(mask.sum())
    if n == 0:
        return logits_strong.sum() * 0.0, 0
    target = target[mask]
    weight = None
    if balance:  # 1 / (share of the confident rows with this pseudo-label); clusters with none keep weight 1
        counts = torch.bincount(target, minlength=logits_strong.shape[1]).to(logits_strong.dtype)
        weight = torch.ones_like(counts)
        seen = counts > 0
        weight[seen] = n / counts[seen]
    return F.cross_entropy(logits_strong[mask], target, weight=weight), n
