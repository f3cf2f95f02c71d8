"""CNN5, the five-layer CNN backbone of paper 001 (METHODS.md, M3-M5)."""

from __future__ import annotations

import torch
from torch import nn

CNN5_CHANNELS = (32, 64, 128, 256, 512)


class CNN5(nn.Module):
    """Five 5x5 conv layers with ReLU and 2x2 max-pooling, channels 32-64-128-256-512, then GAP."""

    def __init__(self, in_chans: int = 1, channels: tuple[int, ...] = CNN5_CHANNELS):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)
