"""A streaming `index build`: vectors land in part shards as they are embedded, so an interrupted
build resumes where it stopped (`--resume`), and the FAISS index is filled shard by shard.

    with StreamingBuild(DIR, fingerprint, spec, cfg, overwrite=..., resume=...) as build:
        for chunk in ...:
            build.add(VectorSet(...))        # a part shard, written atomically, ids continue
        manifest = build.finish()            # FAISS from the parts, then the one-rename commit

While it runs the build holds the folder's write lock. Until `finish` commits, the parts are not
part of any version: readers keep seeing the previous index (or none, for a first build).

`index compact` goes the same way (indexer.index_dir._rewrite_live): the live rows are read a row group at
a time into new shards of this build's part size, FAISS is trained on the same sample and filled shard by shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.atomic import atomic_path
from indexer.config import IndexConfig
from indexer.errors import RetrieveError
from indexer.faiss_index import fill_index, new_index
from indexer.fingerprint import fingerprint_difference
from indexer.index_dir import (
    CHUNK_BYTES,
    MANIFEST,
    TRAIN_SAMPLE,
    IndexManifest,
    _collect_garbage,
    _commit,
    _describe,
    _now,
    _parse_manifest,
    _presize,
    _sample_step,
    _tag,
    check_can_build,
    mark_as_index,
    new_manifest,
    write_lock,
)
from indexer.shards import ROW_ID, Shard, ShardReader, write_shard
from indexer.store import VECTOR_COLUMN, VectorSet, vector_file_meta, vectors_from_table

log = logging.getLogger(__name__)

STATE = "build.json"
# TRAIN_SAMPLE (vectors that train an IVF quantiser) and CHUNK_BYTES (vectors of one part): indexer.index_dir,
# shared with `index compact`; this module reads its own names


class StreamingBuild:
    def __init__(
        self,
        index_dir: str | Path,
        fingerprint: dict[str, Any],
        encoder_spec: dict[str, Any],
        cfg: IndexConfig,
        overwrite: bool = False,
        data: Path | None = None,
        resume: bool = False,
    ):
        self.dir = Path(index_dir)
        self.fingerprint, self.spec, self.cfg = fingerprint, encoder_spec, cfg
        self.overwrite, self.data, self.resume = overwrite, data, resume
        self._lock: Any = None
        self.parts: list[dict[str, Any]] = []
        self.run = ""
        self.resumed_rows = 0
        self.complete: IndexManifest | None = None  # --resume on a build that had already finished

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> StreamingBuild:
        resumable = self.resume and (self.dir / STATE).is_file()
        if self.resume and not resumable and (self.dir / MANIFEST).is_file():
            self.complete = _parse_manifest(self.dir / MANIFEST)
            log.info("--index %s: nothing to resume, the build had finished", self.dir)
            self._lock = contextlib.nullcontext()
            return self
        if not resumable:
            check_can_build(self.dir, self.overwrite, self.data)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = write_lock(self.dir)
        self._lock.__enter__()
        try:
            self._start(resumable)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.__exit__(kind, exc, tb)  # parts stay on disk for --resume

    def _start(self, resumable: bool) -> None:
        mark_as_index(self.dir)
        state = self._read_state() if resumable else None
        if state is not None:
            diff = fingerprint_difference(state["fingerprint"], self.fingerprint)
            if diff:
                raise RetrieveError(
                    f"--index {self.dir}: the interrupted build used encoder {state['fingerprint'].get('encoder')} "
                    f"({diff}); resume with the same encoder, or build again without --resume"
                )
            self.run = state["run"]
            self.parts = [p for p in state["parts"] if (self.dir / p["name"]).is_file()]
            self.resumed_rows = sum(p["rows"] for p in self.parts)
            log.info("--index %s: resuming, %d images already embedded", self.dir, self.resumed_rows)
        else:
            self._drop_parts()
            self.run = secrets.token_hex(4)
            self.parts = []
            self._write_state()

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.dir / STATE).read_text(encoding="utf-8"))
            if isinstance(state, dict) and {"run", "fingerprint", "parts"} <= set(state):
                return state
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        log.warning("--index %s: the interrupted build's state is unreadable; starting over", self.dir)
        return None

    def _write_state(self) -> None:
        state = {"run": self.run, "fingerprint": self.fingerprint, "parts": self.parts, "updated": _now()}
        with atomic_path(self.dir / STATE) as tmp:
            tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")

    def _drop_parts(self) -> None:
        """Remove an interrupted earlier build's parts, never the parts the committed index is made of: an
        `--overwrite` build that fails leaves the index it would have replaced as it was (its files go only
        with the new build's commit, `_collect_garbage`)."""
        keep: set[str] = set()
        if (self.dir / MANIFEST).is_file():
            try:
                keep = set(_parse_manifest(self.dir / MANIFEST).file_names())
            except RetrieveError:
                pass  # not a manifest of ours: check_can_build has refused such a folder already
        for p in self.dir.glob("part-*.parquet"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
        (self.dir / STATE).unlink(missing_ok=True)

    # --- embedding side -------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self.complete.count if self.complete else sum(p["rows"] for p in self.parts)

    def pending(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The rows (path, frame_index) not embedded yet by an interrupted run of this build."""
        if self.complete is not None:
            return rows.iloc[:0]
        if not self.parts:
            return rows
        reader = self._reader()
        done, _ = reader.read(columns=["path", "frame_index"])
        key_done = set(done["path"].astype(str) + "#" + done["frame_index"].astype("string").fillna(""))
        keys = rows["path"].astype(str) + "#" + rows["frame_index"].astype("string").fillna("")
        return rows.loc[~keys.isin(key_done)].reset_index(drop=True)

    def add(self, vs: VectorSet) -> None:
        """One embedded chunk becomes a part shard (written atomically), then the state records it."""
        if len(vs) == 0:
            return
        first = self.rows
        ids = np.arange(first, first + len(vs), dtype=np.int64)
        path = self.dir / f"part-{self.run}-{len(self.parts):05d}.parquet"
        self.parts.append({**write_shard(path, vs, ids), **_describe(path)})
        self._write_state()

    def _reader(self) -> ShardReader:
        return ShardReader([Shard(self.dir / p["name"], p["rows"], p["id_min"], p["id_max"]) for p in self.parts])

    # --- index side -------------------------------------------------------------------------------

    def finish(self) -> IndexManifest:
        """FAISS from the parts, shard by shard; then the manifest names the parts and one rename commits."""
        if self.complete is not None:
            return self.complete
        n = self.rows
        if n == 0:
            raise RetrieveError("no vectors to index")
        dim = int(self.fingerprint.get("dim") or 0)
        reader = self._reader()
        index, kind, params = new_index(dim, n, self.cfg.kind, self.cfg, self.cfg.gpu)
        _presize(index, n)

        def batches():
            for s in range(len(self.parts)):
                yield self._part_vectors(s), reader.shard_ids(s)

        fill_index(index, batches, sample=lambda: self._train_sample(reader, n), folder=self.dir)
        manifest = new_manifest(self.dir, n, dim, kind, params, self.fingerprint, self.spec, self._labels(reader))
        manifest.shards = list(self.parts)
        _commit(self.dir, manifest, index, _tag(manifest))
        (self.dir / STATE).unlink(missing_ok=True)
        _collect_garbage(self.dir, manifest)  # the replaced index's parts, kept while the build was resumable
        return manifest

    def _labels(self, reader: ShardReader) -> pd.DataFrame:
        """A `label` column with the counts of every part's labels, its strings shared (8 bytes a row)."""
        counts: dict[Any, int] = {}
        for s in range(len(self.parts)):
            if "label" in reader.row_columns(s):
                labels = self._read_part(s, ["label"]).column("label").to_pandas()
                for label, c in labels.value_counts(dropna=False).items():
                    key = None if pd.isna(label) else label
                    counts[key] = counts.get(key, 0) + int(c)
        if not counts:
            return pd.DataFrame()
        keys = np.empty(len(counts), dtype=object)
        keys[:] = list(counts)
        return pd.DataFrame({"label": np.repeat(keys, list(counts.values()))})

    def _train_sample(self, reader: ShardReader, n: int) -> np.ndarray:
        """Up to TRAIN_SAMPLE vectors drawn evenly from every part."""
        step = _sample_step(n, TRAIN_SAMPLE)
        out = []
        for s in range(len(self.parts)):
            out.append(self._part_vectors(s)[::step].copy())  # a copy: not a view keeping the part alive
        return np.vstack(out)

    def _read_part(self, s: int, columns: list[str]) -> pa.Table:
        """Columns of one part through a file of its own, not pre-buffered. (A pyarrow ParquetFile kept
        open, as ShardReader keeps every shard's, holds the bytes of its last pre-buffered read: reading
        every part through one reader would keep the whole store in memory until the reader goes.)"""
        with pa.OSFile(str(self.dir / self.parts[s]["name"])) as f:
            return pq.ParquetFile(f, pre_buffer=False).read(columns=columns)

    def _part_vectors(self, s: int) -> np.ndarray:
        return vectors_from_table(self._read_part(s, [VECTOR_COLUMN]), self.dir / self.parts[s]["name"])


def _vector_file_meta(path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(fingerprint, encoder spec, dim) of a vectors file from its Parquet schema alone; one-line errors."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RetrieveError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return vector_file_meta(schema, path)


def build_from_vectors(
    index_dir: str | Path, vectors: str | Path, cfg: IndexConfig, overwrite: bool = False
) -> IndexManifest:
    """`index build --vectors FILE|FOLDER` without reading the store whole: every Parquet file is read a
    chunk (CHUNK_BYTES of vectors) at a time into a part shard, then FAISS is trained on a sample and
    filled shard by shard (`StreamingBuild.finish`). Peak memory: the FAISS index, one shard, the sample."""
    vectors = Path(vectors)
    if vectors.is_dir():
        files = sorted(vectors.glob("*.parquet"))
        if not files:
            raise RetrieveError(f"{vectors}: folder without vector shards (*.parquet)")
    elif vectors.is_file():
        files = [vectors]
    else:
        raise RetrieveError(f"{vectors}: vectors file not found")
    metas = [_vector_file_meta(f) for f in files]  # every file checked before anything is written
    fingerprint, spec, dim = metas[0]
    for f, (fp, _, d) in zip(files[1:], metas[1:]):
        diff = fingerprint_difference(fingerprint, fp) or (f"dim {dim} vs {d}" if d != dim else None)
        if diff:
            raise RetrieveError(
                f"{vectors}: shards from different encoders ({files[0].name} vs {f.name}: {diff}); "
                "embed them again with one encoder"
            )
    fingerprint = {**fingerprint, "dim": dim}
    chunk = max(1, CHUNK_BYTES // (4 * dim))
    with StreamingBuild(index_dir, fingerprint, spec, cfg, overwrite=overwrite) as build:
        for f in files:
            for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=chunk):
                table = pa.Table.from_batches([batch])
                vecs = vectors_from_table(table, f)
                rows = table.drop_columns([c for c in (VECTOR_COLUMN, ROW_ID) if c in table.column_names])
                frame = rows.to_pandas()
                if "frame_index" in frame.columns:
                    frame["frame_index"] = frame["frame_index"].astype("Int64")
                build.add(VectorSet(frame, vecs, fingerprint, spec))
        return build.finish()
