"""The softmax cluster head of a clustering checkpoint (`retrieve train --method pica|lsd|scan`), applied to
an encoder's vectors: each image's cluster and that cluster's probability, stored as index columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from retrieval.encoders.checkpoint import load_checkpoint_extras
from retrieval.errors import RetrieveError

CLUSTER_COLUMNS = ("cluster", "cluster_probability")


@dataclass
class ClusterHeadWeights:
    """The softmax cluster head a clustering checkpoint stores: p = softmax((W v + b) / T) on the unit vector."""

    weight: torch.Tensor
    bias: torch.Tensor
    temperature: float

    @property
    def clusters(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        v = torch.nn.functional.normalize(torch.as_tensor(np.asarray(vectors, dtype=np.float32)), dim=1)
        if v.shape[1] != self.weight.shape[1]:
            raise RetrieveError(f"vectors are {v.shape[1]}-d but the cluster head takes {self.weight.shape[1]}-d")
        return torch.softmax((v @ self.weight.T + self.bias) / self.temperature, dim=1).numpy()


def load_cluster_head(checkpoint: str, head: str = "cluster") -> ClusterHeadWeights:
    """The cluster head (`cluster` or `overcluster`) of a checkpoint from `retrieve train --method pica|lsd|scan`."""
    meta, extras = load_checkpoint_extras(checkpoint)
    if f"{head}.weight" not in extras:
        what = "an over-clustering head" if head == "overcluster" else "a cluster head"
        raise RetrieveError(f"checkpoint {checkpoint}: has no {what} (train one with --method pica, lsd or scan)")
    temperature = float(meta.get("training", {}).get("cluster_temperature", 0.1))
    return ClusterHeadWeights(extras[f"{head}.weight"].float(), extras[f"{head}.bias"].float(), temperature)


def has_cluster_head(encoder_name: str) -> bool:
    """Whether a checkpoint stores a cluster head (False for named encoders and plain checkpoints)."""
    if not encoder_name.endswith((".safetensors", ".json")):
        return False
    try:
        return "cluster.weight" in load_checkpoint_extras(encoder_name)[1]
    except (RetrieveError, OSError, ValueError):
        return False


def with_cluster_columns(rows: pd.DataFrame, vectors: np.ndarray, head: ClusterHeadWeights) -> pd.DataFrame:
    """The rows with `cluster` (int) and `cluster_probability` (of that cluster, 4 decimals) from the head."""
    prob = head.probabilities(vectors)
    out = rows.copy()
    out["cluster"] = prob.argmax(1).astype(np.int64)
    out["cluster_probability"] = np.round(prob.max(1), 4)
    return out
