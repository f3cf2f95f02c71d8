"""Which indexed rows a removal means: by id, path, patient or column conditions (`retrieve index remove`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.errors import RetrieveError
from indexer.search import candidate_mask

if TYPE_CHECKING:
    from indexer.index_dir import IndexDir


def row_selector(
    ids: Sequence[str] = (),
    paths: Sequence[str | Path] = (),
    patients: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
) -> Callable[[IndexDir], np.ndarray]:
    """A `select(idx)` for `remove_from_index_dir`: rows matching ANY of the ids, paths or patients, or ALL of
    the `where` conditions. A path matches as given or resolved; a `where` column the index lacks is an error.
    A `where` condition matches as a query's filter does (indexer.search.candidate_mask): on a column of
    `|`-separated sets, `label=liver` selects every row whose set names liver (`kidney|liver` too)."""
    if not (ids or paths or patients or where):
        raise RetrieveError("say what to remove: --id, --path, --patient or --where")
    wanted_paths = {str(p) for p in paths} | {str(Path(p).expanduser().resolve()) for p in paths}

    def select(idx: IndexDir) -> np.ndarray:
        for col, value in where:
            if col not in idx.columns:
                raise RetrieveError(
                    f"--where {col}={value}: unknown column '{col}' (columns: {', '.join(idx.columns)})"
                )
        cols = ["id", "path", "patient_id", *[c for c, _ in where]]
        rows = idx.read_columns([c for c in dict.fromkeys(cols) if c in idx.columns])
        mask = (
            rows["id"].astype(str).isin(list(ids)).to_numpy() | rows["path"].astype(str).isin(wanted_paths).to_numpy()
        )
        if patients and "patient_id" in rows:
            mask |= rows["patient_id"].astype("string").isin(list(patients)).fillna(False).to_numpy(dtype=bool)
        if where:
            matched = candidate_mask(rows, [], where)
            mask |= np.ones(len(rows), dtype=bool) if matched is None else matched
        return mask

    return select
