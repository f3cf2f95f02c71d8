"""Which indexed rows a removal means: by id, path, patient or column conditions (`retrieve index remove`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from indexer.errors import RetrieveError
from indexer.search import candidate_mask

if TYPE_CHECKING:
    from indexer.index_dir import IndexDir

SHOWN_VALUES = 4  # `summary` names at most this many values


class RowSelector:
    """A `select(idx)` for `remove_from_index_dir`: rows matching ANY of the ids, paths or patients, or ALL of
    the `where` conditions. A path matches as given or resolved; a `where` column the index lacks is an error.
    A `where` condition matches as a query's filter does (indexer.search.candidate_mask): on the `label` column
    of `|`-separated sets, `label=liver` selects every row whose set names liver (`kidney|liver` too) and
    `label==liver` only the rows labelled exactly {liver}; every other column matches its exact text.

    After a call, `counts` holds how many rows the `where` conditions matched with each distinct value of their
    columns (several columns: the values joined by ' / '), most first; `summary()` says it in a few words when
    they matched several values (label=liver: liver and kidney|liver), '' when one (an exact match)."""

    def __init__(
        self,
        ids: Sequence[str] = (),
        paths: Sequence[str | Path] = (),
        patients: Sequence[str] = (),
        where: Sequence[tuple[str, str]] = (),
    ):
        if not (ids or paths or patients or where):
            raise RetrieveError("say what to remove: --id, --path, --patient or --where")
        self.ids, self.patients, self.where = list(ids), list(patients), list(where)
        self.wanted_paths = {str(p) for p in paths} | {str(Path(p).expanduser().resolve()) for p in paths}
        self.counts: dict[str, int] = {}

    def __call__(self, idx: IndexDir) -> np.ndarray:
        for col, value in self.where:
            if col not in idx.columns:
                raise RetrieveError(
                    f"--where {col}={value}: unknown column '{col}' (columns: {', '.join(idx.columns)})"
                )
        where_cols = list(dict.fromkeys(c for c, _ in self.where))
        cols = ["id", "path", "patient_id", *where_cols]
        rows = idx.read_columns([c for c in dict.fromkeys(cols) if c in idx.columns])
        mask = (
            rows["id"].astype(str).isin(self.ids).to_numpy()
            | rows["path"].astype(str).isin(self.wanted_paths).to_numpy()
        )
        if self.patients and "patient_id" in rows:
            mask |= rows["patient_id"].astype("string").isin(self.patients).fillna(False).to_numpy(dtype=bool)
        if self.where:
            matched = candidate_mask(rows, [], self.where)
            matched = np.ones(len(rows), dtype=bool) if matched is None else matched
            mask |= matched
            keys = pd.Series([""] * int(matched.sum()), dtype=object)
            for j, col in enumerate(where_cols):
                text = rows[col].astype("string").fillna("").to_numpy()[matched]
                keys = keys + (" / " if j else "") + pd.Series(text, dtype=object)
            counts = keys.value_counts(sort=False)
            self.counts = {str(k): int(n) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))}
        return mask

    def summary(self, shown: int = SHOWN_VALUES) -> str:
        """The matched rows per `where` value, e.g. "liver: 6, kidney|liver: 2" ('' when no `where` or a single
        value); at most `shown` values, the rest counted together."""
        if len(self.counts) < 2:
            return ""
        items = [(k if k.strip(" /") else "(no value)", n) for k, n in self.counts.items()]
        text = ", ".join(f"{k}: {n}" for k, n in items[:shown])
        rest = items[shown:]
        if rest:
            text += f", {len(rest)} other value{'s' if len(rest) > 1 else ''}: {sum(n for _, n in rest)}"
        return text


def row_selector(
    ids: Sequence[str] = (),
    paths: Sequence[str | Path] = (),
    patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
) -> RowSelector:
    """A RowSelector (a `select(idx)` for `remove_from_index_dir`), see there."""
    return RowSelector(ids, paths, patients, where)
