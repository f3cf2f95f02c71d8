"""The Encoder module: normalisation + backbone + optional projection head + L2 normalisation."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import PreprocessConfig


def build_head(in_dim: int, head_dims: list[int]) -> nn.Module:
    """MLP projection: Linear-ReLU between layers, plain Linear at the end (SimCLR style)."""
    layers: list[nn.Module] = []
    d = in_dim
    for j, h in enumerate(head_dims):
        layers.append(nn.Linear(d, h))
        if j < len(head_dims) - 1:
            layers.append(nn.ReLU(inplace=True))
        d = h
    return nn.Sequential(*layers)


ARCH_EXTRAS = ("in_chans", "mean", "std", "head_dims", "concat_weight")  # fields Encoder adds to a backbone's arch


def concat_vectors(head: torch.Tensor, features: torch.Tensor, weight: float) -> torch.Tensor:
    """`vectors_from: concat`: [w * head/|head|, (1 - w^2)^0.5 * f/|f|], a unit vector whose cosine
    similarity is w^2 * cos(heads) + (1 - w^2) * cos(backbone features)."""
    h, f = F.normalize(head, dim=1), F.normalize(features, dim=1)
    return F.normalize(torch.cat([weight * h, (1.0 - weight**2) ** 0.5 * f], dim=1), dim=1)


class Encoder(nn.Module):
    """Image encoder with everything needed to reproduce and identify its vectors.

    `arch` is a JSON-able description from which the registry rebuilds the same network;
    `source` says where the weights came from (for people, not for comparison).
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        arch: dict[str, Any],
        in_chans: int = 3,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
        head_dims: list[int] | None = None,
        default_preprocess: PreprocessConfig | None = None,
        source: str = "random init",
        concat_weight: float | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        self.feature_dim = feature_dim
        self.head_dims = list(head_dims or [])
        self.head = build_head(feature_dim, self.head_dims) if self.head_dims else nn.Identity()
        # concat_weight set: the vector is the head's output joined to the backbone features (concat_vectors)
        self.concat_weight = None if concat_weight is None else float(concat_weight)
        self.arch = {**arch, "in_chans": in_chans, "mean": list(mean), "std": list(std), "head_dims": self.head_dims}
        if self.concat_weight is not None:
            self.arch["concat_weight"] = self.concat_weight
        self.default_preprocess = default_preprocess or PreprocessConfig()
        self.source = source
        # per-channel normalisation of the grey image replicated to in_chans channels
        m = torch.tensor(mean, dtype=torch.float32)
        s = torch.tensor(std, dtype=torch.float32)
        if m.numel() == 1:
            m, s = m.repeat(in_chans), s.repeat(in_chans)
        self.register_buffer("mean", m.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)

    @property
    def base_arch(self) -> dict[str, Any]:
        """The backbone description alone (what `build_backbone` needs), without normalisation and head."""
        return {k: v for k, v in self.arch.items() if k not in ARCH_EXTRAS}

    @property
    def dim(self) -> int:
        out = self.head_dims[-1] if self.head_dims else self.feature_dim
        return out + self.feature_dim if self.concat_weight is not None else out

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output before the head (the representation f(x) of paper 001)."""
        return self.backbone(self.normalise_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.concat_weight is not None:
            return concat_vectors(self.head(f), f, self.concat_weight)
        return F.normalize(self.head(f), dim=1)

    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer, so two encoders with equal hashes give equal vectors."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def fingerprint(self, preprocess: PreprocessConfig, name: str) -> dict[str, Any]:
        """What must match for two vector sets to be comparable."""
        return {
            "encoder": name,
            "arch": self.arch,
            "weights_sha256": self.weights_sha256(),
            "dim": self.dim,
            "preprocess": preprocess.to_dict(),
        }


# the rule that makes two vector sets comparable lives with the index that enforces it
from indexer.fingerprint import FINGERPRINT_KEYS, fingerprint_difference  # noqa: E402,F401
