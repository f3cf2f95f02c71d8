"""Every loss against a direct computation on a tiny batch, worked out independently with loops."""

import math

import pytest
import torch

from retrieval.training.losses import (
    LOSSES,
    MethodLoss,
    contrastive_loss,
    nt_xent,
    siamese_l1_loss,
    supcon_loss,
    weak_simclr_loss,
)


def test_contrastive_by_hand():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]])  # distances 5, 0.5, 5
    same = torch.tensor([1, 0, 0])
    # same: 0.5 * 25; different within margin 2: 0.5 * (2 - 0.5)^2; different beyond margin: 0
    expected = (12.5 + 0.5 * 1.5**2 + 0.0) / 3
    assert contrastive_loss(a, b, same, margin=2.0).item() == pytest.approx(expected)


def test_siamese_l1_by_hand():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 3.0], [0.25, 0.0]])  # L1 4 -> x = 2; L1 0.25 -> x = 0.5
    same = torch.tensor([1, 0])
    expected = (2.0 + max(1.0 - 0.5, 0.0)) / 2
    loss = siamese_l1_loss(a, b, same, margin=1.0, bce_weight=0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    logit = torch.tensor([2.0, -1.0])
    bce = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert siamese_l1_loss(a, b, same, 1.0, logit, 1.0).item() == pytest.approx(expected + bce, abs=1e-5)


def _ntxent_loops(z1, z2, tau):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).tolist()
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = {j: sum(x * y for x, y in zip(z[i], z[j])) / tau for j in range(n2) if j != i}
        total += -(sims[pos] - math.log(sum(math.exp(s) for s in sims.values())))
    return total / n2


def test_ntxent_against_loops():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for tau in (0.1, 0.5):
        assert nt_xent(z1, z2, tau).item() == pytest.approx(_ntxent_loops(z1, z2, tau), rel=1e-5)


def _supcon_loops(views, labels, tau):
    n, v, _ = views.shape
    z = torch.nn.functional.normalize(views.reshape(n * v, -1), dim=1).tolist()
    lab = [int(labels[i // v]) for i in range(n * v)]
    losses = []
    for i in range(n * v):
        others = [j for j in range(n * v) if j != i]
        denom = math.log(sum(math.exp(sum(x * y for x, y in zip(z[i], z[j])) / tau) for j in others))
        pos = [j for j in others if lab[j] == lab[i]]
        if not pos:
            continue
        losses.append(-sum(sum(x * y for x, y in zip(z[i], z[p])) / tau - denom for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_supcon_against_loops():
    g = torch.Generator().manual_seed(1)
    views = torch.randn(5, 2, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1])
    assert supcon_loss(views, labels, 0.1).item() == pytest.approx(_supcon_loops(views, labels, 0.1), rel=1e-5)
    # one view per image and a singleton class: that anchor has no positive and is left out
    single = torch.randn(4, 1, 4, generator=g)
    lab = torch.tensor([0, 0, 1, 3])
    assert supcon_loss(single, lab, 0.2).item() == pytest.approx(_supcon_loops(single, lab, 0.2), rel=1e-5)


def test_weak_simclr_is_the_weighted_sum():
    g = torch.Generator().manual_seed(2)
    z1, z2, logits = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)
    y = torch.tensor([0, 1, 1])
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    nt = _ntxent_loops(z1, z2, 0.1)
    assert weak_simclr_loss(z1, z2, logits, y, 0.5, 0.1).item() == pytest.approx(0.5 * ce + 0.5 * nt, rel=1e-5)
    assert weak_simclr_loss(z1, z2, logits, y, 0.0, 0.1).item() == pytest.approx(nt, rel=1e-5)
    assert weak_simclr_loss(z1, z2, logits, y, 1.0, 0.1).item() == pytest.approx(ce, rel=1e-5)


def test_supcon_matches_pytorch_metric_learning():
    """pytorch-metric-learning as an independent oracle: one view per image, several label patterns."""
    from pytorch_metric_learning.losses import SupConLoss as PMLSupCon

    g = torch.Generator().manual_seed(3)
    emb = torch.randn(8, 5, generator=g)
    for labels in ([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0, 1]):
        y = torch.tensor(labels)
        expected = PMLSupCon(temperature=0.1)(emb, y).item()
        assert supcon_loss(emb[:, None], y, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_one_label_has_no_signal():
    """Every image of one label: no negatives, loss 0 (as pytorch-metric-learning), with a gradient of 0."""
    from pytorch_metric_learning.losses import SupConLoss as PMLSupCon

    views = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    loss = supcon_loss(views, y, 0.1)
    assert loss.item() == 0.0 == PMLSupCon(temperature=0.1)(views.detach()[:, 0], y).item()
    loss.backward()
    assert torch.count_nonzero(views.grad) == 0


def test_registry_holds_one_interface():
    """Every method is a MethodLoss scoring a Batch; label-free ones say so."""
    assert all(issubclass(cls, MethodLoss) for cls in LOSSES.values())
    assert {m for m, cls in LOSSES.items() if not cls.needs_labels} >= {"simclr"}
    assert {"siamese", "siamese-l1", "simclr", "supcon", "weak-simclr", "supervised"} <= set(LOSSES)
