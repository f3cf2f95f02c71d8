"""A dataset is a folder of class sub-folders or a manifest (CSV/Parquet: path,label,patient_id,...).

`load_dataset` turns either into one table with a row per image (a multi-frame DICOM clip gives a
row per frame) and the list of files it had to skip, each with the reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from indexer.privacy import person_name_columns
from retrieval.config import PreprocessConfig
from retrieval.csvrows import read_user_csv
from retrieval.data.imageio import is_dicom, is_image_file, read_frame
from retrieval.data.preprocess import preprocess_frame, to_tensor
from retrieval.errors import RetrieveError, UnreadableImageError

log = logging.getLogger(__name__)

CORE_COLUMNS = ["id", "path", "label", "patient_id", "frame_index"]
# names the engine gives meaning to in stored rows and query results; a manifest may not use them
RESERVED_COLUMNS = ("id", "vector", "score", "rank")
MANIFEST_NAMES = ("labels.csv", "manifest.csv", "manifest.parquet")


@dataclass
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        reason = " ".join(str(self.reason).split())
        return f"skipped {self.path}: {reason[:200]}"


@dataclass
class DatasetTable:
    """Rows to embed (CORE_COLUMNS + metadata columns) and the files that were skipped."""

    rows: pd.DataFrame
    root: Path
    skipped: list[Skipped] = field(default_factory=list)


def _clean_str(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    s = str(value).strip()
    return s or None


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt"):
            df = read_user_csv(path, str(path), dtype={"label": str, "patient_id": str, "path": str})
        else:
            raise RetrieveError(f"{path}: a manifest must be .csv or .parquet")
    except UnicodeDecodeError:
        raise RetrieveError(f"{path}: manifest is not UTF-8 text (save it as UTF-8 CSV)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError, TypeError) as exc:
        msg = " ".join(str(exc).split())[:160]
        raise RetrieveError(f"{path}: cannot read manifest ({msg})") from None
    df.columns = [str(c) for c in df.columns]
    duplicated = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if duplicated:
        raise RetrieveError(f"{path}: manifest has the column(s) {', '.join(duplicated)} more than once")
    reserved = [c for c in df.columns if c in RESERVED_COLUMNS]
    if reserved:
        raise RetrieveError(
            f"{path}: column '{reserved[0]}' is reserved ({', '.join(RESERVED_COLUMNS)} are the engine's own); "
            "rename it"
        )
    if "path" not in df.columns:
        raise RetrieveError(
            f"{path}: manifest is missing the required column 'path' (columns: {', '.join(map(str, df.columns))})"
        )
    if df.empty:
        raise RetrieveError(f"{path}: manifest has no rows")
    names = person_name_columns(df.columns)
    if names:  # patients' and staff names never reach an index (indexer.privacy); their values are never logged
        log.warning("%s: dropped the person-name column(s) %s: names are never indexed", path, ", ".join(names))
        df = df.drop(columns=names)
    return df


def _rows_from_folder(root: Path) -> pd.DataFrame:
    """Every file under root; labels from class sub-folders (CLASS/IMAGE) only.

    A tree whose images lie deeper (a PACS export PAT/STUDY/SERIES/IM0001) has no class folders: its
    rows get no label (join labels from a CSV instead), never the name of a patient's folder.
    """
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)
    )
    rels = [f.relative_to(root) for f in files]
    deep = next((r for f, r in zip(files, rels) if len(r.parts) > 2 and is_image_file(f)), None)
    if deep is not None:
        log.info(
            "%s: images lie deeper than CLASS/IMAGE (%s), so the folders are not classes: indexed without labels "
            "(join labels with --labels CSV)",
            root,
            deep.as_posix(),
        )
    records = []
    for rel in rels:
        label = rel.parts[0] if len(rel.parts) > 1 and deep is None else None
        records.append({"path": rel.as_posix(), "label": label})
    return pd.DataFrame.from_records(records, columns=["path", "label"])


def find_manifest(folder: Path) -> Path | None:
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_dataset(source: str | Path) -> DatasetTable:
    """Read a dataset folder or manifest into a table of images, listing skipped files."""
    src = Path(source).expanduser()
    if not src.exists():
        raise RetrieveError(f"{src}: no such file or folder")
    if src.is_dir():
        manifest = find_manifest(src)
        root = src.resolve()
        raw = _read_manifest(manifest) if manifest else _rows_from_folder(root)
        origin = str(manifest) if manifest else str(src)
    else:
        root = src.resolve().parent
        raw = _read_manifest(src)
        origin = str(src)
    if raw.empty:
        raise RetrieveError(f"{src}: empty folder, no image files found")
    return _resolve_rows(raw, root, origin, folder_labels=manifest is None if src.is_dir() else False)


def _frame_number(value: object) -> int | None:
    """A manifest's frame_index: empty, or a whole number from 0 up (not 'abc', 1.5 or 1e23)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value).strip() == "":
        return None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"frame_index {text[:20]!r} is not a frame number") from None
    if not number.is_integer() or not 0 <= number < 2**31:
        raise ValueError(f"frame_index {text[:20]!r} is not a frame number")
    return int(number)


def _stored_path(abs_path: Path, root: Path) -> tuple[str, str, bool]:
    """A file's id (its path relative to the data root `root`, resolved), its stored absolute path, and whether
    it lies outside the root.

    A file inside the root is stored by its resolved path, as before. A link inside the root to a file outside
    it is stored as the user placed it (the link's own path, under the root), never by the target's absolute
    path; reading it later still checks where it leads (the server refuses a file outside the root). A path
    that is itself outside the root (a manifest naming ../x.png or an absolute path) keeps its resolved absolute
    path as id and path, with no path relative to the root (retrieval.relocate: rel_path null, never moved)."""
    real = abs_path.resolve()
    try:
        return real.relative_to(root).as_posix(), str(real), False
    except ValueError:
        pass
    placed = Path(os.path.normpath(abs_path))
    try:
        rel = placed.relative_to(root).as_posix()
    except ValueError:
        return real.as_posix(), str(real), True
    if placed.resolve() != real:  # `..` after a linked folder: the text does not name the file that was found
        return real.as_posix(), str(real), True
    return rel, str(placed), False


def _resolve_rows(raw: pd.DataFrame, root: Path, origin: str, folder_labels: bool = False) -> DatasetTable:
    """Manifest or folder rows -> image rows (a row per frame), DICOM identity columns from the headers.

    `folder_labels`: the labels are folder names; if a DICOM file's folder is named after its PatientID,
    the folders are patients, not classes, and every row goes unlabelled.
    """
    from retrieval.data.dicom import IDENTITY_COLUMNS, read_dicom_header

    skipped: list[Skipped] = []
    meta_cols = [c for c in raw.columns if c not in CORE_COLUMNS]
    out: list[dict] = []
    seen: dict[str, str | None] = {}  # id -> its label
    patient_folders = any_dicom = False
    n_outside = 0
    has_frame_col = "frame_index" in raw.columns
    for rec in raw.to_dict("records"):
        rel = _clean_str(rec.get("path"))
        if rel is None:
            skipped.append(Skipped(f"{origin} (row without a path)", "empty 'path'"))
            continue
        try:
            p = Path(rel).expanduser()
            abs_path = p if p.is_absolute() else root / p
            found = abs_path.is_file()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, an unknown ~user, a name too long
            skipped.append(Skipped(rel[:120], f"not a usable path ({type(exc).__name__})"))
            continue
        if not found:
            skipped.append(Skipped(str(abs_path), "file not found"))
            continue
        if not is_image_file(abs_path):
            skipped.append(Skipped(str(abs_path), f"not an image file ('{abs_path.suffix or 'no suffix'}')"))
            continue
        base = {
            "label": _clean_str(rec.get("label")),
            "patient_id": _clean_str(rec.get("patient_id")),
            **{c: rec.get(c) for c in meta_cols},
        }
        rel_id, stored, outside_root = _stored_path(abs_path, root)
        frames: list[int | None] = [None]
        try:
            given_frame = _frame_number(rec.get("frame_index") if has_frame_col else None)
        except ValueError as exc:
            skipped.append(Skipped(str(abs_path), str(exc)))
            continue
        if is_dicom(abs_path):
            try:
                header = read_dicom_header(abs_path)
            except UnreadableImageError as exc:
                skipped.append(Skipped(str(abs_path), exc.reason))
                continue
            if given_frame is not None and given_frame >= header.n_frames:
                skipped.append(Skipped(str(abs_path), f"frame_index {given_frame} but the file has {header.n_frames}"))
                continue
            if folder_labels and base["label"] is not None and base["label"] == header.patient_id:
                patient_folders = True
            for col, value in header.identity.items():  # the manifest's own values win
                if _clean_str(base.get(col)) is None:
                    base[col] = value
            any_dicom = True
            if given_frame is not None:
                frames = [given_frame]
            elif header.n_frames > 1:
                frames = list(range(header.n_frames))
        for fr in frames:
            fid = rel_id if fr is None else f"{rel_id}#{fr}"
            if fid in seen:
                if seen[fid] != base["label"] and not folder_labels:  # as --labels: which one is meant?
                    raise RetrieveError(
                        f"{origin}: {fid} is listed twice with two different labels ({seen[fid]!r}, "
                        f"{base['label']!r}); keep one row"
                    )
                skipped.append(Skipped(str(abs_path), "listed twice"))
                continue
            seen[fid] = base["label"]
            frame_value = fr if fr is not None else given_frame
            out.append({"id": fid, "path": stored, "frame_index": frame_value, **base})
            n_outside += outside_root
    if not out:
        detail = f"; first problem: {skipped[0]}" if skipped else ""
        raise RetrieveError(f"{origin}: no readable image files found{detail}")
    if n_outside:
        log.warning(
            "%s: %d image(s) lie outside the data root %s: stored by their absolute paths, which results show "
            "and a relocation cannot move",
            origin,
            n_outside,
            root,
        )
    df = pd.DataFrame.from_records(out)
    df["frame_index"] = df["frame_index"].astype("Int64")
    identity = [c for c in IDENTITY_COLUMNS if c not in CORE_COLUMNS and c not in meta_cols] if any_dicom else []
    for col in identity:
        df[col] = df[col].astype("string") if col in df else pd.Series(pd.NA, index=df.index, dtype="string")
    df = df[CORE_COLUMNS + identity + meta_cols]
    if patient_folders:
        log.info(
            "%s: the first-level folders are named after the files' PatientID, so they are patients, not "
            "classes: indexed without labels (join labels with --labels CSV)",
            origin,
        )
        df["label"] = None
    _check_labels(df, origin)
    return DatasetTable(rows=df.reset_index(drop=True), root=root, skipped=skipped)


def _check_labels(rows: pd.DataFrame, origin: str) -> None:
    """Refuse a multi-label label with an empty class part (`normal|`, `|`, `a||b`): it would enter the index
    and break every later vote that meets it (retrieval.labels.label_set)."""
    from retrieval.labels import LABEL_SEPARATOR, label_set

    sets = rows[rows["label"].astype("string").str.contains(LABEL_SEPARATOR, regex=False).fillna(False)]
    for image_id, label in zip(sets["id"], sets["label"]):  # only the rows that name several classes
        try:
            label_set(label)
        except RetrieveError:
            raise RetrieveError(
                f"{origin}: image {image_id}: label {label!r} has an empty class name; write several classes "
                "as 'a|b' with no empty part"
            ) from None


class FrameDataset(Dataset):
    """Yields (tensor or None, row position, reason it failed or None) so bad files never stop a run."""

    def __init__(self, rows: pd.DataFrame, cfg: PreprocessConfig):
        self.paths = rows["path"].tolist()
        self.frames = [(-1 if pd.isna(f) else int(f)) for f in rows["frame_index"].tolist()]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_frame(self.paths[i], self.frames[i], self.cfg.ct_window)
            return to_tensor(preprocess_frame(img, self.cfg)), i, None
        except UnreadableImageError as exc:
            return None, i, exc.reason
        except Exception as exc:  # a decoder bug in one file must not abort the whole archive
            return None, i, f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"


def collate_frames(batch):
    """Stack the readable items; pass the failures through as (position, message)."""
    good = [(t, i) for t, i, e in batch if t is not None]
    bad = [(i, e) for t, i, e in batch if t is None]
    tensors = torch.stack([t for t, _ in good]) if good else None
    return tensors, [i for _, i in good], bad
