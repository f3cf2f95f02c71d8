"""What the server serves, loaded once at start and shared by every request: the encoder, the index,
the id -> row map and the data root that bounds every file the server reads."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from indexer.index_dir import IndexDir, open_index_dir, read_manifest
from indexer.search import parse_where
from retrieval.cases import case_column, check_aggregation
from retrieval.data.imageio import read_frame
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.pipeline import LoadedEncoder, encoder_for_index, query_files
from retrieval.relocate import resolve_data_root, resolve_paths
from retrieval.results import item_json, query_payload
from retrieval.server.uploads import UploadError, unreadable
from retrieval.vote import VOTE_WEIGHTINGS

log = logging.getLogger(__name__)


class NotFound(RetrieveError):
    """An item id the index does not hold."""


class Forbidden(RetrieveError):
    """A file outside the data root."""


@dataclass
class Engine:
    idx: IndexDir
    loaded: LoadedEncoder
    ids: dict[str, int]  # item id -> row id
    data_root: Path  # where the indexed files are now (resolved); nothing outside it is ever read
    lock: threading.Lock  # one query at a time through the encoder and the shard readers
    data_root_option: Path | None = None  # the operator's --data-root, passed on as `retrieve query` does

    @property
    def count(self) -> int:
        return self.idx.count

    def query(
        self,
        upload: Path,
        name: str,
        k: int,
        exclude_patients: Sequence[str] = (),
        where: Sequence[str] = (),
        vote: str = "majority",
        include_self: bool = False,
        group_by: str | None = None,
        agg: str = "max",
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The same call and the same JSON as `retrieve query --json` for this one file."""
        if vote not in VOTE_WEIGHTINGS:
            raise RetrieveError(f"vote {vote}: choose one of {', '.join(VOTE_WEIGHTINGS)}")
        if group_by is not None:
            case_column(group_by)
        check_aggregation(agg)
        if k > self.count:
            raise RetrieveError(f"k {k}: larger than the {self.count} images in the index")
        conditions = parse_where(list(where))
        with self.lock:
            results, errors = query_files(
                self.idx,
                self.loaded,
                [str(upload)],
                k,
                list(exclude_patients),
                conditions,
                vote,
                include_self,
                group_by=group_by,
                agg=agg,
                data_root=self.data_root_option,
            )
            device = self.idx.search_device
        if errors:
            raise unreadable(errors[0], upload, name)
        named = [replace(r, query=r.query.replace(str(upload), name, 1)) for r in results]
        return query_payload(named, 1, device)

    def row(self, item_id: str) -> dict[str, Any]:
        """The item's row, its path where the file is now (under the data root, for a relocatable index)."""
        row_id = self.ids.get(item_id)
        if row_id is None:
            raise NotFound(f"no item {item_id!r} in the index")
        with self.lock:
            rows = self.idx.fetch([row_id])
        return resolve_paths(rows, self.data_root).to_dict("records")[0]

    def item(self, item_id: str) -> dict[str, Any]:
        return item_json(self.row(item_id))

    def locate(self, stored: str) -> Path:
        """An indexed path as a file under the data root; Forbidden for anything that would leave it."""
        target = self.data_root / stored  # an absolute path stays as it is; the resolved file is checked
        try:
            real = target.resolve(strict=True)  # symlinks followed: where the bytes really are
        except (OSError, RuntimeError):
            raise NotFound("the item's file is missing under the data root") from None
        if not real.is_relative_to(self.data_root) or not real.is_file():
            raise Forbidden("the item's file lies outside the data root")
        return real

    def thumbnail(self, item_id: str, max_side: int) -> bytes:
        """The item's frame as a PNG whose longest side is at most max_side."""
        row = self.row(item_id)
        path = self.locate(str(row["path"]))
        frame = row.get("frame_index")
        f = -1 if frame is None or pd.isna(frame) else int(frame)
        try:
            img = Image.fromarray(read_frame(path, f, self.loaded.preprocess.ct_window))
        except UnreadableImageError as exc:
            raise UploadError(422, f"item {item_id}: {exc.reason}") from None
        img.thumbnail((max_side, max_side))
        out = io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()


def _common_folder(idx: IndexDir, paths: pd.Series) -> Path:
    """An index that records no data root (built before relocatable indexes): its files' common folder."""
    absolute = [str(Path(p).parent) for p in paths.astype(str).unique() if os.path.isabs(p)]
    return Path(os.path.commonpath(absolute)) if absolute else idx.path.parent


def load_engine(index: Path, data_root: Path | None = None, use_gpu: bool = True) -> Engine:
    """Load the encoder (checked against the index's fingerprint) and the index, once."""
    manifest = read_manifest(index)
    loaded = encoder_for_index(manifest.fingerprint, manifest.encoder_spec, f"--index {index}")
    idx = open_index_dir(index, use_gpu=use_gpu)
    table = idx.read_columns(["id", "path"])
    ids = dict(zip(table["id"].astype(str), (int(i) for i in idx.live_ids)))
    recorded = resolve_data_root(idx, data_root)  # a given --data-root must hold the files (one-line error)
    root = (recorded or _common_folder(idx, table["path"])).resolve()
    if root == Path(root.anchor):
        raise RetrieveError(
            f"--index {index}: the indexed files share no folder below {root}; rebuild the index from the "
            "folder that holds them (the server reads no file outside its data root)"
        )
    engine = Engine(idx, loaded, ids, root, threading.Lock(), data_root)
    log.info("serving %d images of %s; files read only under %s", idx.count, index, root)
    return engine
