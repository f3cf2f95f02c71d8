"""Labels joined from a CSV onto image rows: by path, by SOPInstanceUID (`sop_uid`) or by `accession`.

An archive arrives without labels; a reading list or a registry export names, per image or per study,
what it shows. The CSV has a `label` column and one key column: `path` (relative to the data root, or
absolute), `sop_uid` (one image), or `accession` (every image of that study). Keys that match no image
are reported, never silently dropped; images the CSV does not name have no label.

Multi-label: a label `liver|kidney` names a set of classes (split on `|`, each part stripped of spaces,
order and repeats ignored). A label whose parts include an empty one (`liver|`, `|`, `a||b`) is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from indexer.search import SET_SEPARATOR, set_parts
from retrieval.csvrows import read_user_csv
from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

LABEL_KEYS = ("path", "sop_uid", "accession")
LABEL_SEPARATOR = SET_SEPARATOR
MULTILABEL_MODES = ("auto", "on", "off")


def is_multilabel(labels: Iterable[object]) -> bool:
    """Whether any label (text) names several classes, i.e. contains `|`."""
    return any(isinstance(lab, str) and LABEL_SEPARATOR in lab for lab in labels)


def label_set(label: str, where: str = "") -> frozenset[str]:
    """The classes a label names: `liver|kidney` -> {kidney, liver}; a one-class label -> {label}.
    An empty part is bad input (`where` says where the label came from, e.g. " (image id 7)")."""
    parts = set_parts(label)  # the indexer's splitting of the `|` format; the strict check is ours
    if not all(parts):
        raise RetrieveError(
            f"label {label!r}{where}: an empty class name; write several classes as 'a|b' with no empty part"
        )
    return frozenset(parts)


def set_text(classes: Iterable[str]) -> str:
    """A label set as one label text: the classes sorted, joined by `|` (the empty set: '')."""
    return LABEL_SEPARATOR.join(sorted(classes))


def label_matrix(labels: Sequence[str], where: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(the classes, sorted; an (n labels x classes) boolean matrix, True where a label names the class).
    `where[i]` says where label i came from, for the error on a bad label. Each distinct label is parsed
    once (an archive has a million labels but a handful of distinct ones)."""
    codes, distinct = pd.factorize(pd.Series(list(labels), dtype=object), sort=False)
    first = np.full(len(distinct), -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]  # the first row of each distinct label, for its error
    sets = [label_set(lab, "" if where is None else where[first[j]]) for j, lab in enumerate(distinct)]
    classes = sorted(set().union(*sets)) if sets else []
    at = {c: j for j, c in enumerate(classes)}
    per_label = np.zeros((len(sets), len(classes)), dtype=bool)
    for j, s in enumerate(sets):
        per_label[j, [at[c] for c in s]] = True
    return classes, per_label[codes]


def check_multilabel_mode(mode: str) -> str:
    if mode not in MULTILABEL_MODES:
        raise RetrieveError(f"--multilabel {mode}: choose one of {', '.join(MULTILABEL_MODES)}")
    return mode


@dataclass
class LabelJoin:
    """What a join did: the key used, rows labelled, and the CSV keys that matched no image."""

    key: str
    labelled: int
    unlabelled: int
    unknown_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"labels joined by {self.key}: {self.labelled} images labelled, {self.unlabelled} not in the CSV"
        if self.unknown_keys:
            shown = ", ".join(self.unknown_keys[:5]) + (", ..." if len(self.unknown_keys) > 5 else "")
            text += f"; {len(self.unknown_keys)} CSV key(s) match no image ({shown})"
        return text


def read_label_csv(csv: str | Path) -> tuple[str, pd.DataFrame]:
    """The key column's name and a (key, label) table, one label per key (a key listed twice must agree)."""
    path = Path(csv).expanduser()
    if path.is_dir():
        raise RetrieveError(f"--labels {csv}: is a folder; give a CSV file")
    if not path.is_file():
        raise RetrieveError(f"--labels {csv}: no such file")
    try:
        df = read_user_csv(path, f"--labels {csv}", dtype=str, keep_default_na=False)
    except UnicodeDecodeError:
        raise RetrieveError(f"--labels {csv}: not UTF-8 text (save it as UTF-8 CSV)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as exc:
        raise RetrieveError(f"--labels {csv}: cannot read it ({' '.join(str(exc).split())[:160]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if "label" not in df.columns:
        raise RetrieveError(f"--labels {csv}: no 'label' column (columns: {', '.join(df.columns)})")
    key = next((k for k in LABEL_KEYS if k in df.columns), None)
    if key is None:
        raise RetrieveError(
            f"--labels {csv}: needs a key column, one of {', '.join(LABEL_KEYS)} (columns: {', '.join(df.columns)})"
        )
    table = pd.DataFrame({"key": df[key].str.strip(), "label": df["label"].str.strip()})
    table = table[(table["key"] != "") & (table["label"] != "")].drop_duplicates()
    clash = table["key"][table["key"].duplicated()]
    if len(clash):
        raise RetrieveError(f"--labels {csv}: {key} {clash.iloc[0]!r} is given two different labels")
    if table.empty:
        raise RetrieveError(f"--labels {csv}: no rows with both a {key} and a label")
    for k, lab in zip(table["key"], table["label"]):
        if LABEL_SEPARATOR in lab:
            label_set(lab, f" (--labels {csv}, {key} {k})")
    return key, table


def _path_keys(values: pd.Series, root: Path | None) -> pd.Series:
    """Paths as comparable keys: absolute, resolved (relative ones under `root`)."""

    def norm(text: str) -> str:
        p = Path(text).expanduser()
        if not p.is_absolute() and root is not None:
            p = root / p
        try:
            return str(p.resolve())
        except (OSError, RuntimeError, ValueError):
            return str(p)

    return values.astype(str).map(norm)


def join_labels(rows: pd.DataFrame, csv: str | Path, root: Path | None) -> tuple[pd.DataFrame, LabelJoin]:
    """`rows` with their `label` column replaced by the CSV's; `root` resolves relative paths on both sides.

    The rows' `path` must hold usable paths (absolute, or relative to `root`).
    """
    key, table = read_label_csv(csv)
    if key != "path" and key not in rows.columns:
        raise RetrieveError(
            f"--labels {csv}: joins by {key}, but the images have no {key} column (only DICOM files have one)"
        )
    if key == "path":
        row_keys = _path_keys(rows["path"], root)
        table = table.assign(key=_path_keys(table["key"], root))
    else:
        row_keys = rows[key].astype("string").fillna("").str.strip()
    mapping = dict(zip(table["key"], table["label"]))
    labels = row_keys.map(mapping)
    out = rows.copy()
    out["label"] = labels.astype("string").astype(object).where(labels.notna(), None)
    unknown = sorted(set(table["key"]) - set(row_keys))
    report = LabelJoin(key, int(labels.notna().sum()), int(labels.isna().sum()), unknown)
    if report.labelled == 0:
        raise RetrieveError(f"--labels {csv}: none of its {len(table)} {key} keys matches an image")
    log.info("%s", report.summary())
    return out, report
