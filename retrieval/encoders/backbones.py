"""Backbones from an architecture description (`arch` dict), without weights.

Both the registry (named encoders) and checkpoints (saved encoders) build their networks here, so
neither needs the other to rebuild one.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from retrieval.encoders.cnn5 import CNN5
from retrieval.encoders.intensity import IntensityStats
from retrieval.encoders.multilayer import MultiLayerPool, output_dim
from retrieval.errors import RetrieveError


def build_backbone(arch: dict[str, Any]) -> tuple[torch.nn.Module, int]:
    """A backbone without weights from an `arch` description; returns it and its feature size."""
    kind = arch.get("type")
    if kind == "cnn5":
        cnn = CNN5(in_chans=arch.get("in_chans", 1))
        return cnn, cnn.num_features
    if kind == "intensity-stats":
        return IntensityStats(), IntensityStats.num_features
    if kind == "timm":
        import timm

        model = arch.get("model")
        if not isinstance(model, str) or not timm.is_model(model):
            hub = isinstance(model, str) and (":" in model or "/" in model)
            raise RetrieveError(
                f"unknown timm architecture {model!r}"
                + ("; model hubs are never contacted: download the weights and pass --weights FILE" if hub else "")
            )
        try:
            net = timm.create_model(model, pretrained=False, num_classes=0, in_chans=int(arch.get("in_chans", 3)))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RetrieveError(f"timm architecture {model!r}: cannot be built ({exc})") from None
        if arch.get("pool_layers"):
            return pooled(net, arch["pool_layers"], arch.get("in_chans", 3))
        return net, int(cast(int, net.num_features))  # a timm attribute; nn.Module types it as a Tensor
    raise RetrieveError(f"unknown architecture type {kind!r} in checkpoint")


def pooled(net: torch.nn.Module, layers: list[str], in_chans: int) -> tuple[torch.nn.Module, int]:
    """`net` with the named layers average-pooled and concatenated to its output, and the new width."""
    try:
        wrapped = MultiLayerPool(net, layers)
    except ValueError as exc:
        raise RetrieveError(f"pool_layers: {exc}") from None
    return wrapped, output_dim(wrapped, in_chans)
