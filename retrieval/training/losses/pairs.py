"""Same/different pairs for the Siamese losses: from labels (half positives) or from a pairs file."""

from __future__ import annotations

import numpy as np
import torch


class PairSampler:
    """Pairs from labels (half positives) or from a pairs table of row indices (a, b, same)."""

    def __init__(self, labels: np.ndarray, pairs: np.ndarray | None, gen: torch.Generator):
        self.labels, self.pairs, self.gen = labels, pairs, gen
        self.by_label = {c: np.flatnonzero(labels == c) for c in np.unique(labels)} if labels is not None else {}

    def sample(self, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.pairs is not None:
            pick = torch.randint(len(self.pairs), (len(anchors),), generator=self.gen).numpy()
            p = self.pairs[pick]
            return p[:, 0], p[:, 1], p[:, 2]
        want_pos = torch.rand(len(anchors), generator=self.gen).numpy() < 0.5
        partners, same = np.empty_like(anchors), np.zeros(len(anchors), dtype=np.int64)
        r = torch.rand(len(anchors), generator=self.gen).numpy()
        for j, a in enumerate(anchors):
            lab = self.labels[a]
            pos = self.by_label[lab]
            pos = pos[pos != a]
            if want_pos[j] and len(pos):
                partners[j], same[j] = pos[int(r[j] * len(pos))], 1
            else:
                neg = np.flatnonzero(self.labels != lab)
                if not len(neg):
                    partners[j], same[j] = pos[int(r[j] * len(pos))] if len(pos) else a, 1
                else:
                    partners[j] = neg[int(r[j] * len(neg))]
        return anchors, partners, same
