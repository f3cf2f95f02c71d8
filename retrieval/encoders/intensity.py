"""First-order intensity statistics as a fixed, parameter-free backbone.

Where the finding is echogenicity (steatosis brightens the liver), the grey-level distribution of a
region is the classic hand-crafted description. This backbone gives it: mean, standard deviation,
five quantiles and a 16-bin histogram of the grey image (23 values), so a trained head can be
compared with one on deep features under the same protocol.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
BINS = 16
SCALE = 10.0  # centred values times 10: about unit scale for a head's default initialisation


class IntensityStats(nn.Module):
    """(N, 1, H, W) grey images in [0, 1] -> (N, 23): mean, std, quantiles (centred on mid-grey), histogram
    fractions (centred on uniform), all times SCALE."""

    num_features = 2 + len(QUANTILES) + BINS
    q: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("q", torch.tensor(QUANTILES), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).float().clamp(0.0, 1.0)
        quant = torch.quantile(flat, self.q.to(flat.device), dim=1).T
        idx = (flat * BINS).long().clamp_(max=BINS - 1)
        hist = (
            torch.zeros(len(flat), BINS, device=flat.device).scatter_add_(1, idx, torch.ones_like(flat)) / flat.shape[1]
        )
        stats = torch.cat(
            [flat.mean(1, keepdim=True) - 0.5, flat.std(1, keepdim=True), quant - 0.5, hist - 1.0 / BINS], 1
        )
        return stats * SCALE
