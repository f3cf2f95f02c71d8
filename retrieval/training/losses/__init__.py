"""Training losses: one interface (`MethodLoss.forward(batch)`), one registry the trainer reads.

Adding a method: a new file with a `MethodLoss` subclass, and one line in `LOSSES` below."""

from __future__ import annotations

from retrieval.training.losses.base import Batch, LossContext, MethodLoss
from retrieval.training.losses.contrastive import ContrastiveLoss, contrastive_loss
from retrieval.training.losses.fixmatch import FixMatchLoss, fixmatch_loss
from retrieval.training.losses.lsd import LSDLoss
from retrieval.training.losses.ntxent import NTXentLoss, nt_xent
from retrieval.training.losses.pica import PICALoss
from retrieval.training.losses.scan import SCANLoss
from retrieval.training.losses.siamese_l1 import SiameseL1Loss, siamese_l1_loss
from retrieval.training.losses.supcon import SupConLoss, supcon_loss
from retrieval.training.losses.supervised import SupervisedLoss
from retrieval.training.losses.weak_simclr import WeakSimCLRLoss, weak_simclr_loss

LOSSES: dict[str, type[MethodLoss]] = {
    "siamese": ContrastiveLoss,
    "siamese-l1": SiameseL1Loss,
    "simclr": NTXentLoss,
    "supcon": SupConLoss,
    "weak-simclr": WeakSimCLRLoss,
    "supervised": SupervisedLoss,
    "pica": PICALoss,
    "lsd": LSDLoss,
    "scan": SCANLoss,
    "fixmatch": FixMatchLoss,
}

__all__ = [
    "LOSSES",
    "Batch",
    "LossContext",
    "MethodLoss",
    "contrastive_loss",
    "fixmatch_loss",
    "nt_xent",
    "siamese_l1_loss",
    "supcon_loss",
    "weak_simclr_loss",
]
