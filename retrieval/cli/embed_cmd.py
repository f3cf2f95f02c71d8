"""`retrieve embed`: argument parsing only; the work is in retrieval.pipeline."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.errors import RetrieveError


def embed(
    data: Path = typer.Argument(..., help="dataset folder (class sub-folders) or manifest CSV/Parquet"),
    out: Path = typer.Option(..., "--out", "-o", help="vectors Parquet file to write (--engine ray: a shard folder)"),
    encoder: str = opt.Encoder,
    weights: str | None = opt.Weights,
    seed: int = opt.Seed,
    image_size: int | None = opt.ImageSize,
    crop_sector: bool | None = opt.CropSector,
    resize: str | None = opt.Resize,
    ct_window: str | None = opt.CtWindow,
    batch_size: int = opt.BatchSize,
    workers: int | None = opt.Workers,
    gpu: bool = opt.Gpu,
    quiet: bool = opt.Quiet,
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a pool of Ray actors)"),
    address: str | None = typer.Option(None, "--address", help="--engine ray: cluster to join (ray://host:10001)"),
    actors: int = typer.Option(2, "--actors", help="--engine ray: encoder actors (one GPU each where there are GPUs)"),
):
    """Embed every image of DATA into a Parquet vectors file."""
    from indexer.store import write_vectors
    from retrieval.pipeline import embed_dataset, load_encoder, report_skipped

    if engine not in ("local", "ray"):
        raise RetrieveError(f"--engine {engine}: use local or ray")
    if engine == "ray":
        from retrieval.pipeline import report_skipped
        from retrieval.ray_engine import embed_with_ray

        t0 = time.perf_counter()
        spec, pre = (
            opt.encoder_spec(encoder, weights, seed),
            opt.preprocess_overrides(image_size, crop_sector, resize, ct_window),
        )
        res = embed_with_ray(data, spec, pre, out, actors, address, batch_size, gpu)
        report_skipped(res.skipped)
        print(
            f"embedded {res.rows} images ({res.dim}-d, {encoder}) on {actors} Ray actors in "
            f"{time.perf_counter() - t0:.1f} s -> {out}/ ({res.shards} shards)"
            + (f"; skipped {len(res.skipped)}" if res.skipped else "")
        )
        return
    if out.is_dir():
        raise RetrieveError(f"--out {out}: is a folder; give the path of a .parquet file to write")
    loaded = load_encoder(
        opt.encoder_spec(encoder, weights, seed), opt.preprocess_overrides(image_size, crop_sector, resize, ct_window)
    )
    t0 = time.perf_counter()
    vs, skipped = embed_dataset(data, loaded, batch_size, workers, gpu, not quiet)
    write_vectors(out, vs)
    report_skipped(skipped)
    print(
        f"embedded {len(vs)} images ({vs.dim}-d, {encoder}) in {time.perf_counter() - t0:.1f} s -> {out}"
        + (f"; skipped {len(skipped)}" if skipped else "")
    )
