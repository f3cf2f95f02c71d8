"""`retrieve embed`: argument parsing only; the work is in retrieval.pipeline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from retrieval.cli import options as opt
from retrieval.cli import pacs_cmd as pacs
from retrieval.errors import RetrieveError

if TYPE_CHECKING:
    from retrieval.pipeline import LoadedEncoder


def embed(
    data: Path | None = typer.Argument(
        None, help="dataset folder (class sub-folders) or manifest CSV/Parquet (or --dicomweb URL)"
    ),
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
    dicomweb: str | None = pacs.Dicomweb,
    study: list[str] = pacs.Study,
    modality: str | None = pacs.Modality,
    since: str | None = pacs.Since,
    body_part: str | None = pacs.BodyPart,
    dicomweb_auth: Path | None = pacs.Auth,
    viewer_url: str | None = pacs.ViewerUrl,
    insecure: bool = pacs.Insecure,
):
    """Embed every image of DATA (or of a PACS, with --dicomweb) into a Parquet vectors file."""
    from indexer.store import write_vectors
    from retrieval.pipeline import embed_dataset, load_encoder, report_skipped

    if engine not in ("local", "ray"):
        raise RetrieveError(f"--engine {engine}: use local or ray")
    if (data is None) == (dicomweb is None):
        raise RetrieveError("give DATA (a folder or manifest) or --dicomweb URL, one of them")
    if dicomweb is None and (study or modality or since or body_part or dicomweb_auth or viewer_url or insecure):
        raise RetrieveError("--study, --modality, --since, --body-part, --dicomweb-auth, --viewer-url: need --dicomweb")
    if dicomweb is not None:
        if engine != "local":
            raise RetrieveError(f"--dicomweb with --engine {engine}: a PACS is embedded in this process")
        _check_out(out)
        loaded = load_encoder(
            opt.encoder_spec(encoder, weights, seed),
            opt.preprocess_overrides(image_size, crop_sector, resize, ct_window),
        )
        _embed_pacs(
            dicomweb, out, loaded, encoder, studies=study, modality=modality, since=since, body_part=body_part,
            auth=dicomweb_auth, viewer_url=viewer_url, insecure=insecure, batch_size=batch_size, gpu=gpu, quiet=quiet,
        )  # fmt: skip
        return
    assert data is not None
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
    _check_out(out)
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


def _check_out(out: Path) -> None:
    """The vectors file, before any embedding: a .parquet path that can be written."""
    from indexer.atomic import check_writable

    if not out.is_dir() and out.suffix.lower() != ".parquet":
        raise RetrieveError(f"--out {out}: give a .parquet file (the vectors are written as Parquet)")
    if out.is_file():  # an earlier run's vectors are replaced; any other file is the user's, never ours to overwrite
        import pyarrow as pa
        import pyarrow.parquet as pq

        from indexer.store import vector_file_meta

        try:
            vector_file_meta(pq.read_schema(out), out)
        except (RetrieveError, pa.ArrowInvalid, OSError):
            raise RetrieveError(
                f"--out {out}: exists and is not a vectors file written by `retrieve embed`; it is left as it is "
                "(remove it, or give another path)"
            ) from None
    check_writable(out, "--out")


def _embed_pacs(
    url: str,
    out: Path,
    loaded: LoadedEncoder,
    encoder: str,
    *,
    studies: list[str],
    modality: str | None,
    since: str | None,
    body_part: str | None,
    auth: Path | None,
    viewer_url: str | None,
    insecure: bool,
    batch_size: int,
    gpu: bool,
    quiet: bool,
) -> None:
    """`embed --dicomweb`: fetch and embed the matching instances (retrieval.pacs), write the vectors, show progress."""
    from indexer.store import write_vectors
    from retrieval.cli.pacs_cmd import connection, follow
    from retrieval.data.dicomweb import DicomWebSource, Filters
    from retrieval.pacs import embed_dicomweb
    from retrieval.pipeline import report_skipped

    filters = Filters(tuple(studies), modality, since, body_part)
    cfg, opts = connection(url, auth, insecure, viewer_url, batch_size, gpu)
    t0 = time.perf_counter()
    with DicomWebSource(cfg) as source:
        result = follow(embed_dicomweb(source, filters, loaded, opts), quiet, done="embedded")
    assert result.vectors is not None
    write_vectors(out, result.vectors)
    report_skipped(result.skipped)
    print(
        f"{cfg.url}: {result.found} instance(s) match; fetched {result.fetched}, embedded {result.indexed} "
        f"({len(result.vectors)} images, {result.vectors.dim}-d, {encoder}) in {time.perf_counter() - t0:.1f} s"
        + (f"; skipped {len(result.skipped)}" if result.skipped else "")
        + f" -> {out}"
    )
