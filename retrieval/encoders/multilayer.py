"""Multi-layer pooling: global-average-pool several inner layers of a backbone and concatenate them
with its final features. Mid-level layers keep the texture and echo-level cues of ultrasound tissue
that ImageNet's last layer has learned to ignore (on the Byra steatosis ROIs, frozen-feature MAP
0.633 from the last layer alone, 0.705 with blocks 2-6 added; docs/benchmarks/methods.md)."""

from __future__ import annotations

import torch
from torch import nn


class MultiLayerPool(nn.Module):
    """Wraps `net` (whose forward gives pooled final features); forward returns
    [GAP(layer_1), ..., GAP(layer_n), net(x)] concatenated along the feature axis."""

    def __init__(self, net: nn.Module, layers: list[str]):
        super().__init__()
        self.net = net
        self.layers = list(layers)
        names = {name for name, _ in net.named_modules()}
        missing = [name for name in self.layers if name not in names]
        if missing:
            raise ValueError(f"no layer named {', '.join(missing)} in {type(net).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled: dict[str, torch.Tensor] = {}
        # hooks live only for this call, so the module stays plain (copyable, picklable)
        handles = [
            self.net.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: pooled.__setitem__(name, out.mean((2, 3)))
            )
            for name in self.layers
        ]
        try:
            final = self.net(x)
        finally:
            for h in handles:
                h.remove()
        return torch.cat([pooled[name] for name in self.layers] + [final], dim=1)


@torch.no_grad()
def output_dim(module: nn.Module, in_chans: int) -> int:
    was_training = module.training
    module.eval()
    dim = int(module(torch.zeros(1, in_chans, 64, 64)).shape[1])
    module.train(was_training)
    return dim
