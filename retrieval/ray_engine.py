"""`retrieve embed --engine ray`: the same rows and vectors as the in-process path, embedded by a pool of
Ray actors (one encoder each) and written as a folder of Parquet shards (indexer/shards.py layout).

Ray Data reads the rows `load_dataset` gives; `map_batches` runs `_EncoderActor` (the encoder built once per
actor from the EncoderSpec and preprocessing, as `load_encoder` does) on an ActorPoolStrategy of N actors,
with one GPU each where the cluster has GPUs. The driver streams the results into shards, so a remote cluster
(`--address ray://host:10001`) needs the image paths readable on its workers (a shared filesystem).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from indexer.shards import write_shard
from indexer.store import VECTOR_COLUMN, VectorSet
from retrieval.config import EncoderSpec
from retrieval.data.dataset import Skipped, load_dataset
from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

SKIP_COLUMN = "_skip_reason"  # set on the rows an actor could not read (with the reason); dropped before writing
SHARD_ROWS = 4096  # rows per shard written by the driver


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RetrieveError("--engine ray needs Ray: pip install 'retrieve[ray]'") from None
    return ray


class _EncoderActor:
    """Built once per actor: the encoder and preprocessing; called on each batch of rows."""

    def __init__(self, spec: dict[str, Any], overrides: dict[str, Any], batch_size: int, use_gpu: bool):
        from retrieval.embed import pick_device
        from retrieval.pipeline import load_encoder

        self.loaded = load_encoder(EncoderSpec(**spec), overrides)
        self.batch_size = batch_size
        self.device = pick_device(use_gpu)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from retrieval.embed import embed_rows
        from retrieval.pipeline import annotate_rows

        rows = batch.reset_index(drop=True)
        emb = embed_rows(rows, self.loaded.encoder, self.loaded.preprocess, self.batch_size, 0, self.device, False)
        kept = annotate_rows(emb.rows, emb.vectors, self.loaded).copy()
        kept[VECTOR_COLUMN] = [v.tolist() for v in emb.vectors]  # plain lists: skipped rows hold None
        kept[SKIP_COLUMN] = None
        if not emb.skipped:
            return kept
        bad = pd.DataFrame({"path": [s.path for s in emb.skipped], SKIP_COLUMN: [s.reason for s in emb.skipped]})
        return pd.concat([kept, bad], ignore_index=True)


@dataclass
class RayEmbedded:
    out: Path
    rows: int
    dim: int
    shards: int
    skipped: list[Skipped]


def embed_with_ray(
    source: str | Path,
    spec: EncoderSpec,
    overrides: dict[str, Any],
    out: str | Path,
    actors: int = 2,
    address: str | None = None,
    batch_size: int = 32,
    use_gpu: bool = True,
) -> RayEmbedded:
    """Embed every row of SOURCE on Ray actors into a new folder OUT of vector shards."""
    ray = _import_ray()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RetrieveError(f"--out {out}: exists and is not an empty folder (the ray engine writes a shard folder)")
    if actors < 1:
        raise RetrieveError(f"--actors {actors}: give at least 1")
    from retrieval.pipeline import load_encoder

    table = load_dataset(source)
    loaded = load_encoder(spec, overrides)  # on the driver too: the fingerprint written with every shard
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RetrieveError(f"--address {address}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
        started = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 0
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        rows = table.rows.reset_index(drop=True)
        step = max(1, min(batch_size * 4, -(-len(rows) // actors)))  # blocks: work for every actor
        ds = ray.data.from_pandas([rows.iloc[i : i + step] for i in range(0, len(rows), step)])
        ds = ds.map_batches(
            _EncoderActor,
            fn_constructor_args=(spec.to_dict(), overrides, batch_size, gpus > 0),
            batch_size=batch_size * 4,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus > 0 else 0,
        )
        return _write_shards(ds, out, loaded.fingerprint, spec.to_dict(), list(table.skipped), len(table.rows))
    finally:
        if started:
            ray.shutdown()


def _write_shards(
    ds: Any, out: Path, fingerprint: dict[str, Any], spec: dict[str, Any], skipped: list[Skipped], total: int
) -> RayEmbedded:
    """Stream the actors' batches into shards in a temporary folder, renamed to OUT when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pending: list[pd.DataFrame] = []
        n_rows, n_shards, dim = 0, 0, 0

        def flush() -> None:
            nonlocal n_rows, n_shards, dim, pending
            rows = pd.concat(pending, ignore_index=True)
            pending = []
            vectors = np.stack([np.asarray(v, dtype=np.float32) for v in rows[VECTOR_COLUMN]])
            rows = rows.drop(columns=[VECTOR_COLUMN])
            vs = VectorSet(rows, vectors, fingerprint, spec)
            write_shard(tmp / f"part-{n_shards:05d}.parquet", vs, np.arange(n_rows, n_rows + len(vs), dtype=np.int64))
            n_rows, n_shards, dim = n_rows + len(vs), n_shards + 1, vs.dim

        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            bad = batch[SKIP_COLUMN].notna()
            skipped += [Skipped(str(p), str(r)) for p, r in zip(batch.loc[bad, "path"], batch.loc[bad, SKIP_COLUMN])]
            good = batch.loc[~bad].drop(columns=[SKIP_COLUMN]).reset_index(drop=True)
            if len(good):
                pending.append(good)
            if sum(len(p) for p in pending) >= SHARD_ROWS:
                flush()
        if pending:
            flush()
        if n_rows == 0:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise RetrieveError(f"none of the {total} images could be read{first}")
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RayEmbedded(out, n_rows, dim, n_shards, skipped)
