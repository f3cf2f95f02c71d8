"""CSV files users write (manifests, label tables): a row with more fields than the header is refused with
its line number. pandas would otherwise shift such a row's columns under the wrong names (its first fields
become an index), and the user would read "file not found" or "no path matches" about values they never put
in those columns."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.errors import RetrieveError


def read_user_csv(path: Path, what: str, **kwargs: Any) -> pd.DataFrame:
    """pd.read_csv(path) that never shifts columns: a trailing comma is tolerated, a row with more
    non-empty fields than the header is a one-line error "WHAT: line N has K fields, the header M"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        df = pd.read_csv(path, index_col=False, **kwargs)
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        _refuse_long_row(path, what)
    return df


def _refuse_long_row(path: Path, what: str) -> None:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        for row in reader:
            fields = list(row)
            while fields and fields[-1] == "":  # trailing commas leave empty fields, read as no data
                fields.pop()
            if len(fields) > len(header):
                raise RetrieveError(
                    f"{what}: line {reader.line_num} has {len(fields)} fields, the header {len(header)} "
                    f"({', '.join(header)}); quote a value that holds a comma"
                )
