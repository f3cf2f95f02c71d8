"""n-shot classification against labelled anchor images (paper 000): each class scores by the mean
pair similarity of the query with its anchors; the Siamese-L1 head gives sigmoid(dense(|a - b|)),
other checkpoints fall back to cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from retrieval.data.dataset import load_dataset
from retrieval.embed import embed_rows
from retrieval.encoders.checkpoint import load_checkpoint, load_checkpoint_extras
from retrieval.errors import RetrieveError


@dataclass
class Classification:
    label: str
    scores: dict[str, float]  # mean similarity per class
    scorer: str


class AnchorClassifier:
    def __init__(self, checkpoint: str, anchors: str, shots: int | None = None, seed: int = 0):
        self.encoder = load_checkpoint(checkpoint)
        _, extras = load_checkpoint_extras(checkpoint)
        self.head = None
        if "similarity.weight" in extras:
            self.head = torch.nn.Linear(extras["similarity.weight"].shape[1], 1)
            self.head.load_state_dict({"weight": extras["similarity.weight"], "bias": extras["similarity.bias"]})
        table = load_dataset(anchors)
        rows = table.rows[table.rows["label"].notna()]
        if rows.empty:
            raise RetrieveError(f"--anchors {anchors}: no labelled anchor images")
        if shots:
            rows = rows.sample(frac=1.0, random_state=seed).groupby("label").head(shots)
        emb = embed_rows(rows.reset_index(drop=True), self.encoder, self.encoder.default_preprocess, progress=False)
        self.anchor_vectors = torch.as_tensor(emb.vectors)
        self.anchor_labels = emb.rows["label"].astype(str).to_numpy()
        if len(set(self.anchor_labels)) < 2:
            skipped = [*table.skipped, *emb.skipped]
            first = str(skipped[0]).removeprefix("skipped ") if skipped else ""
            unread = f"; {len(skipped)} anchor image(s) could not be read (first: {first})" if skipped else ""
            raise RetrieveError(f"--anchors {anchors}: anchors of at least two classes are needed{unread}")
        self.scorer = "siamese-l1 similarity head" if self.head is not None else "cosine similarity"

    @torch.no_grad()
    def classify_vectors(self, vectors: np.ndarray) -> list[Classification]:
        q = torch.as_tensor(vectors)
        out = []
        for v in q:
            if self.head is not None:
                s = torch.sigmoid(self.head(torch.abs(self.anchor_vectors - v)).squeeze(1)).numpy()
            else:
                s = (self.anchor_vectors @ v).numpy()
            scores = pd.Series(s).groupby(self.anchor_labels).mean().to_dict()
            best = max(scores, key=scores.get)
            out.append(Classification(best, {k: round(float(x), 4) for k, x in scores.items()}, self.scorer))
        return out
