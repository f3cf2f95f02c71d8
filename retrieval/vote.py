"""kNN vote: a suggested label from the neighbours' labels, by majority or by similarity weight.

Multi-label (labels such as `liver|kidney`, see retrieval.labels): each class's vote share is the weight of
the labelled neighbours whose label names it over the weight of all labelled neighbours; the suggested
label is the SET of classes with a share >= 0.5 (MULTILABEL_SHARE), possibly empty. The vote does not use
a checkpoint's `multilabel_thresholds`: those were chosen for its sigmoid head, which a query never runs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from retrieval.errors import RetrieveError
from retrieval.labels import label_set, set_text

VOTE_WEIGHTINGS = ("majority", "similarity")
MULTILABEL_SHARE = 0.5  # a class joins the suggested set when at least this share of the vote names it


@dataclass
class Vote:
    label: str | None
    confidence: float  # the winning label's share of the total vote weight
    votes: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # why there is no label: no labelled neighbours, or an index without labels
    # multi-label only: the suggested classes (label is them joined by '|'); votes are then shares
    labels: list[str] | None = None

    def to_dict(self) -> dict:
        out: dict = {
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "votes": {k: round(v, 4) for k, v in self.votes.items()},
        }
        if self.labels is not None:
            out["labels"] = list(self.labels)
            out["rule"] = f"classes with a vote share >= {MULTILABEL_SHARE}"
        return out if self.note is None else {**out, "note": self.note}


NO_LABELS = "no labels: the index holds no labelled images (join labels with `retrieve index build --labels CSV`)"
NO_LABELLED_NEIGHBOURS = "no labelled neighbours"
NO_CLASS_WITH_HALF = f"no class has a vote share of at least {MULTILABEL_SHARE}"


def no_label_vote() -> Vote:
    """The vote of an index without labels: none, and it says so."""
    return Vote(None, 0.0, {}, NO_LABELS)


def _weight(score: float, weighting: str) -> float:
    return 1.0 if weighting == "majority" else max(0.0, (1.0 + float(score)) / 2.0)


def knn_vote(
    labels: Sequence[str | None],
    scores: Sequence[float],
    weighting: str = "majority",
    multilabel: bool = False,
    ids: Sequence[object] | None = None,
) -> Vote:
    """Neighbours in rank order. Weight 1 each ('majority') or (1 + cosine) / 2 ('similarity').

    Unlabelled neighbours do not vote. Ties go to the label whose best neighbour ranks first.
    `multilabel`: labels are class sets (`a|b`) and the vote is `multilabel_vote`'s; `ids` (the neighbours'
    image ids) name the image in the error on a label with an empty class part (an index built before
    datasets refused them).
    """
    if weighting not in VOTE_WEIGHTINGS:
        raise RetrieveError(f"--vote {weighting}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    if multilabel:
        sets = [
            None
            if lab is None or lab != lab or not str(lab).strip()
            else label_set(lab, f" (neighbour {rank + 1})" if ids is None else f" (image id {ids[rank]})")
            for rank, lab in enumerate(labels)
        ]
        return multilabel_vote(sets, scores, weighting)
    votes: dict[str, float] = {}
    first_rank: dict[str, int] = {}
    for rank, (label, score) in enumerate(zip(labels, scores)):
        if label is None or label != label:  # None or NaN
            continue
        w = _weight(score, weighting)
        votes[label] = votes.get(label, 0.0) + w
        first_rank.setdefault(label, rank)
    total = sum(votes.values())
    if not votes or total <= 0:
        return Vote(None, 0.0, votes, NO_LABELLED_NEIGHBOURS)
    winner = min(votes, key=lambda lab: (-votes[lab], first_rank[lab]))
    ordered = dict(sorted(votes.items(), key=lambda kv: (-kv[1], first_rank[kv[0]])))
    return Vote(winner, votes[winner] / total, ordered)


def multilabel_vote(
    label_sets: Sequence[Collection[str] | None], scores: Sequence[float], weighting: str = "majority"
) -> Vote:
    """Neighbours' class sets in rank order (None: unlabelled, no vote). Each class's share = weight of the
    neighbours naming it / weight of all labelled neighbours; the suggested set = classes with share >=
    MULTILABEL_SHARE. `votes` holds every named class's share (highest first, ties by first rank);
    `confidence` is the lowest share in the suggested set (0 for an empty set)."""
    if weighting not in VOTE_WEIGHTINGS:
        raise RetrieveError(f"--vote {weighting}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
    weight: dict[str, float] = {}
    first_rank: dict[str, int] = {}
    total = 0.0
    for rank, (classes, score) in enumerate(zip(label_sets, scores)):
        if classes is None:
            continue
        w = _weight(score, weighting)
        total += w
        for c in classes:
            weight[c] = weight.get(c, 0.0) + w
            first_rank.setdefault(c, rank)
    if total <= 0:
        return Vote(None, 0.0, {}, NO_LABELLED_NEIGHBOURS, labels=[])
    shares = {c: w / total for c, w in sorted(weight.items(), key=lambda kv: (-kv[1], first_rank[kv[0]]))}
    chosen = sorted(c for c, s in shares.items() if s >= MULTILABEL_SHARE - 1e-12)
    if not chosen:
        return Vote(None, 0.0, shares, NO_CLASS_WITH_HALF, labels=[])
    return Vote(set_text(chosen), min(shares[c] for c in chosen), shares, labels=chosen)
