"""Image hits -> cases: a radiologist compares studies (or series, or patients), not single frames.

The neighbours of a query are grouped by the case column (`study_uid`, `series_uid` or `patient_id`);
a case scores the best (`max`) or the mean (`mean`) similarity of its images among the neighbours
searched. An image without a value in the case column is a case of its own. Cases rank by score, ties
broken by their best image's rank, so the order is fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from retrieval.errors import RetrieveError

CASE_COLUMNS = {"study": "study_uid", "series": "series_uid", "patient": "patient_id"}
AGGREGATIONS = ("max", "mean")


@dataclass(frozen=True)
class CaseHit:
    case: str  # the case's key: a study/series uid or patient id (an image's own id when it has none)
    score: float  # max or mean similarity of its images among the neighbours searched
    images: int  # its images among those neighbours
    best: int  # place, among the image hits, of its most similar image


def case_column(by: str) -> str:
    if by not in CASE_COLUMNS:
        raise RetrieveError(f"--group-by {by}: choose one of {', '.join(CASE_COLUMNS)}")
    return CASE_COLUMNS[by]


def check_aggregation(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise RetrieveError(f"--agg {agg}: choose one of {', '.join(AGGREGATIONS)}")


def case_keys(rows: pd.DataFrame, by: str) -> list[str]:
    """The case of each row; a row without a value in the case column is its own case (keyed by its id)."""
    col = case_column(by)
    values = rows[col].astype("string").fillna("").str.strip() if col in rows else pd.Series([""] * len(rows))
    ids = rows["id"].astype(str).tolist()
    return [v if v else f"image:{i}" for v, i in zip(values.tolist(), ids)]


def aggregate(keys: Sequence[str], scores: Sequence[float], agg: str, k: int) -> list[CaseHit]:
    """Image hits (in rank order, with their case keys) -> the k best cases."""
    check_aggregation(agg)
    groups: dict[str, list[int]] = {}
    for place, key in enumerate(keys):
        groups.setdefault(key, []).append(place)
    cases = []
    for key, places in groups.items():
        values = [float(scores[p]) for p in places]
        score = max(values) if agg == "max" else sum(values) / len(values)
        best = min(places, key=lambda p: (-float(scores[p]), p))
        cases.append(CaseHit(key, score, len(places), best))
    cases.sort(key=lambda c: (-c.score, c.best))
    return cases[:k]
