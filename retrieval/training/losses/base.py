"""The one interface every training loss implements, and what the trainer hands it.

A loss is a small `nn.Module` (pytorch-metric-learning style) built once per training run from a
`LossContext`; it owns the heads only training needs (classifier, pair similarity, cluster heads),
and scores one `Batch` per step. Adding a method: one file with a `MethodLoss` subclass and one line
in `retrieval/training/losses/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from retrieval.encoders.base import Encoder
    from retrieval.training.config import TrainConfig

RowsToFeatures = Callable[[np.ndarray], torch.Tensor]


@dataclass
class LossContext:
    """What a loss may need once, before training: settings, the encoder, the training rows' labels."""

    cfg: TrainConfig
    encoder: Encoder
    n_classes: int
    codes: np.ndarray  # class code of each training row, -1 where unlabelled
    gen: torch.Generator  # the run's random stream (views, sampling)
    frozen: bool
    pairs: np.ndarray | None = None  # (M, 3) row indices a, b and same (a pairs file)
    clean_features: Callable[[], torch.Tensor] | None = None  # backbone features of every row, no augmentation
    classes: list[str] | None = None  # the class name of each code (multi-label rows: `a|b`)
    groups: np.ndarray | None = None  # patient/near-duplicate group of each row (folds.group_ids); None: no such column


@dataclass
class Batch:
    """One training step: row indices, their label codes and a way to draw augmented views."""

    idx: np.ndarray
    labels: torch.Tensor
    view: RowsToFeatures  # backbone features of a fresh random view of the given rows
    project: Callable[[torch.Tensor], torch.Tensor]  # the encoder's projection head
    clean: RowsToFeatures | None = None  # backbone features of the rows without augmentation

    def embed(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """Projected embedding of a fresh random view of `rows` (default: the batch)."""
        return self.project(self.view(self.idx if rows is None else rows))


class MethodLoss(nn.Module):
    """Base of every training loss: `forward(batch) -> scalar`. Parameters it owns are trained too."""

    needs_labels: ClassVar[bool] = True

    def __init__(self, ctx: LossContext):
        super().__init__()

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def finish(self, project: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Called once after the last step, in eval mode; what it returns joins the training log."""
        return {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Trained tensors a checkpoint keeps beside the encoder (e.g. a similarity or cluster head)."""
        return {}
