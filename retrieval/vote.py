"""kNN vote: a suggested label from the neighbours' labels, by majority or by similarity weight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

VOTE_WEIGHTINGS = ("majority", "similarity")


@dataclass
class Vote:
    label: str | None
    confidence: float  # the winning label's share of the total vote weight
    votes: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # why there is no label: no labelled neighbours, or an index without labels

    def to_dict(self) -> dict:
        out = {
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "votes": {k: round(v, 4) for k, v in self.votes.items()},
        }
        return out if self.note is None else {**out, "note": self.note}


NO_LABELS = "no labels: the index holds no labelled images (join labels with `retrieve index build --labels CSV`)"
NO_LABELLED_NEIGHBOURS = "no labelled neighbours"


def no_label_vote() -> Vote:
    """The vote of an index without labels: none, and it says so."""
    return Vote(None, 0.0, {}, NO_LABELS)


def knn_vote(labels: Sequence[str | None], scores: Sequence[float], weighting: str = "majority") -> Vote:
    """Neighbours in rank order. Weight 1 each ('majority') or (1 + cosine) / 2 ('similarity').

    Unlabelled neighbours do not vote. Ties go to the label whose best neighbour ranks first.
    """
    if weighting not in VOTE_WEIGHTINGS:
        from retrieval.errors import RetrieveError

        raise RetrieveError(f"--vote {weighting}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    votes: dict[str, float] = {}
    first_rank: dict[str, int] = {}
    for rank, (label, score) in enumerate(zip(labels, scores)):
        if label is None or label != label:  # None or NaN
            continue
        w = 1.0 if weighting == "majority" else max(0.0, (1.0 + float(score)) / 2.0)
        votes[label] = votes.get(label, 0.0) + w
        first_rank.setdefault(label, rank)
    total = sum(votes.values())
    if not votes or total <= 0:
        return Vote(None, 0.0, votes, NO_LABELLED_NEIGHBOURS)
    winner = min(votes, key=lambda lab: (-votes[lab], first_rank[lab]))
    ordered = dict(sorted(votes.items(), key=lambda kv: (-kv[1], first_rank[kv[0]])))
    return Vote(winner, votes[winner] / total, ordered)
