"""A streaming `index build`: vectors land in part shards as they are embedded, so an interrupted
build resumes where it stopped (`--resume`), and the FAISS index is filled shard by shard.

    with StreamingBuild(DIR, fingerprint, spec, cfg, overwrite=..., resume=...) as build:
        for chunk in ...:
            build.add(VectorSet(...))        # a part shard, written atomically, ids continue
        manifest = build.finish()            # FAISS from the parts, then the one-rename commit

While it runs the build holds the folder's write lock. Until `finish` commits, the parts are not
part of any version: readers keep seeing the previous index (or none, for a first build).
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

from indexer.atomic import atomic_path
from indexer.config import IndexConfig
from indexer.errors import RetrieveError
from indexer.faiss_index import fill_index, new_index
from indexer.fingerprint import fingerprint_difference
from indexer.index_dir import (
    MANIFEST,
    IndexManifest,
    _commit,
    _describe,
    _now,
    _parse_manifest,
    _tag,
    check_can_build,
    mark_as_index,
    new_manifest,
    write_lock,
)
from indexer.shards import Shard, ShardReader, write_shard
from indexer.store import VectorSet

log = logging.getLogger(__name__)

STATE = "build.json"
TRAIN_SAMPLE = 100_000  # vectors that train an IVF quantiser


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
        for p in self.dir.glob("part-*.parquet"):
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

        def batches():
            for s in range(len(self.parts)):
                _, vecs = reader.read_shard(s, columns=[], vectors=True)
                assert vecs is not None
                yield vecs, reader.shard_ids(s)

        fill_index(index, batches, sample=lambda: self._train_sample(reader, n))
        labels, _ = reader.read(columns=["label"])
        manifest = new_manifest(self.dir, n, dim, kind, params, self.fingerprint, self.spec, labels)
        manifest.shards = list(self.parts)
        _commit(self.dir, manifest, index, _tag(manifest))
        (self.dir / STATE).unlink(missing_ok=True)
        return manifest

    def _train_sample(self, reader: ShardReader, n: int) -> np.ndarray:
        """Up to TRAIN_SAMPLE vectors drawn evenly from every part."""
        take = min(1.0, TRAIN_SAMPLE / n)
        out = []
        for s in range(len(self.parts)):
            _, vecs = reader.read_shard(s, columns=[], vectors=True)
            assert vecs is not None
            step = max(1, int(round(1 / take)))
            out.append(vecs[::step])
        return np.vstack(out)
