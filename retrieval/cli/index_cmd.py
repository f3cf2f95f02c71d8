"""`retrieve index build|add|remove|compact|info|verify`: parse, call retrieval/indexer, present."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.cli import pacs_cmd as pacs
from retrieval.cli.output import echo_err
from retrieval.errors import RetrieveError


def index_build(
    data: Path | None = typer.Argument(None, help="dataset folder or manifest (omit with --vectors)"),
    index: Path = typer.Option(..., "--index", "-i", help="index folder to create"),
    vectors: Path | None = typer.Option(
        None, "--vectors", help="vectors from `retrieve embed` (a file, or a shard folder) instead of embedding DATA"
    ),
    kind: str = typer.Option(
        "auto", "--kind", help="auto, flat, hnsw, ivf, ivfpq or a faiss.index_factory string ('OPQ64,IVF4096,PQ64')"
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML recipe (encoder, preprocess, index sections)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing index folder"),
    on_disk: bool = typer.Option(
        False,
        "--on-disk",
        help="IVF kinds: lists in a memory-mapped file of their own, filled shard by shard",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue an interrupted build, embedding only what is missing"
    ),
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
    dicomweb: str | None = pacs.Dicomweb,
    study: list[str] = pacs.Study,
    modality: str | None = pacs.Modality,
    since: str | None = pacs.Since,
    body_part: str | None = pacs.BodyPart,
    dicomweb_auth: Path | None = pacs.Auth,
    commit_every: int | None = pacs.CommitEvery,
    viewer_url: str | None = pacs.ViewerUrl,
    insecure: bool = pacs.Insecure,
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV of labels joined by path, sop_uid or accession (replaces folder labels)"
    ),
):
    """Embed DATA (or take --vectors, or index a PACS: --dicomweb) into a FAISS index over cosine similarity."""
    from indexer.faiss_index import check_kind, check_on_disk_kind
    from indexer.index_dir import check_can_build
    from indexer.streaming import build_from_vectors
    from retrieval.config import IndexConfig, build_settings
    from retrieval.data.dataset import Skipped
    from retrieval.pipeline import build_index_streaming, load_encoder, report_skipped

    kind = check_kind(kind)  # a factory string FAISS rejects fails here, before any embedding
    if on_disk:
        check_on_disk_kind(kind)
    settings = build_settings(
        config,
        IndexConfig(kind=kind, gpu=gpu),
        opt.encoder_spec(encoder, weights, seed),
        opt.preprocess_overrides(image_size, crop_sector, resize, ct_window),
        batch_size,
        encoder_given=encoder != opt.Encoder.default or weights is not None,
        batch_size_given=batch_size != opt.BatchSize.default,
    )
    index_cfg, spec, pre, batch_size = settings.index, settings.encoder, settings.preprocess, settings.batch_size
    if on_disk:
        index_cfg = replace(index_cfg, on_disk=True)
    t0 = time.perf_counter()
    if dicomweb is not None:
        if data is not None or vectors is not None or resume:
            raise RetrieveError("--dicomweb indexes a server: leave out DATA, --vectors and --resume")
        pacs.sync(
            dicomweb,
            index,
            create=True,
            studies=study,
            modality=modality,
            since=since,
            body_part=body_part,
            auth=dicomweb_auth,
            commit_every=commit_every,
            viewer_url=viewer_url,
            insecure=insecure,
            quiet=quiet,
            batch_size=batch_size,
            gpu=gpu,
            load=lambda: load_encoder(spec, pre),
            index_cfg=index_cfg,
            overwrite=overwrite,
        )
        return
    if vectors is not None:
        if data is not None:
            raise RetrieveError("give either DATA or --vectors, not both")
        if resume or labels is not None:
            raise RetrieveError("--resume and --labels apply to embedding DATA, not to --vectors")
        check_can_build(index, overwrite, data)
        manifest = build_from_vectors(index, vectors, index_cfg, overwrite=overwrite)  # a chunk at a time
        skipped: list[Skipped] = []
        resumed = 0
    else:
        if data is None:
            raise RetrieveError("missing DATA (a dataset folder or manifest) or --vectors FILE")
        if not resume:
            check_can_build(index, overwrite, data)  # before the expensive embedding
        loaded = load_encoder(spec, pre)
        manifest, skipped, resumed = build_index_streaming(
            data, loaded, index, index_cfg, batch_size, workers, gpu, not quiet, overwrite, resume, labels=labels
        )
    report_skipped(skipped)
    print(
        f"indexed {manifest.count} images ({manifest.dim}-d, {manifest.kind}, {manifest.params.get('built_on')}) "
        f"in {time.perf_counter() - t0:.1f} s -> {index}"
        + (f"; {resumed} of them embedded by the interrupted run" if resumed else "")
        + (f"; skipped {len(skipped)}" if skipped else "")
    )


def index_add(
    data: Path | None = typer.Argument(None, help="dataset folder or manifest with the new images"),
    index: Path = typer.Option(..., "--index", "-i"),
    batch_size: int = opt.BatchSize,
    workers: int | None = opt.Workers,
    gpu: bool = opt.Gpu,
    quiet: bool = opt.Quiet,
    replace: bool = typer.Option(False, "--replace", help="re-embed images already indexed and replace them"),
    dicomweb: str | None = pacs.Dicomweb,
    study: list[str] = pacs.Study,
    modality: str | None = pacs.Modality,
    since: str | None = pacs.Since,
    body_part: str | None = pacs.BodyPart,
    dicomweb_auth: Path | None = pacs.Auth,
    commit_every: int | None = pacs.CommitEvery,
    viewer_url: str | None = pacs.ViewerUrl,
    insecure: bool = pacs.Insecure,
):
    """Append new images to an index with its own encoder, without a rebuild (--dicomweb: sync a PACS)."""
    from indexer.index_dir import add_to_index_dir, read_manifest
    from retrieval.pipeline import embed_dataset, encoder_for_index, report_skipped
    from retrieval.relocate import rows_for_index

    if dicomweb is not None:
        if data is not None or replace:
            raise RetrieveError("--dicomweb syncs a server: leave out DATA and --replace")
        pacs.sync(
            dicomweb,
            index,
            create=False,
            studies=study,
            modality=modality,
            since=since,
            body_part=body_part,
            auth=dicomweb_auth,
            commit_every=commit_every,
            viewer_url=viewer_url,
            insecure=insecure,
            quiet=quiet,
            batch_size=batch_size,
            gpu=gpu,
        )
        return
    if data is None:
        raise RetrieveError("missing DATA (a dataset folder or manifest) or --dicomweb URL")
    m = read_manifest(index)
    loaded = encoder_for_index(m.fingerprint, m.encoder_spec, f"--index {index}")
    vs, skipped = embed_dataset(data, loaded, batch_size, workers, gpu, not quiet)
    # rel_paths and ids relative to where the index's data root is now: it stays relocatable, and knows the
    # images it holds wherever index and data were moved
    vs.rows = rows_for_index(vs.rows, index)
    manifest, added = add_to_index_dir(index, vs, replace=replace)
    report_skipped(skipped)
    print(
        f"added {added} images ({len(vs) - added} already indexed); index now holds {manifest.count}"
        + (f"; skipped {len(skipped)}" if skipped else "")
    )


def index_remove(
    index: Path = typer.Option(..., "--index", "-i"),
    ids: list[str] = typer.Option([], "--id", help="an image id as listed in results (repeatable)"),
    paths: list[Path] = typer.Option([], "--path", help="an image file (repeatable; all its frames)"),
    patients: list[str] = typer.Option([], "--patient", help="every image of this patient (repeatable)"),
    where: list[str] = typer.Option(
        [],
        "--where",
        help="every image with COLUMN=VALUE (repeatable: all must hold); on `a|b` label sets, label=liver removes "
        "every image whose set names liver (kidney|liver too), label==liver only those labelled exactly liver; "
        "other columns: exact text",
    ),
):
    """Remove images from an index without a rebuild (any kind); `index compact` reclaims the space."""
    from indexer.index_dir import remove_from_index_dir
    from indexer.search import parse_where
    from indexer.selection import row_selector

    select = row_selector(ids, paths, patients, parse_where(where))
    manifest, removed = remove_from_index_dir(index, select)
    kind = "on-disk lists" if manifest.params.get("lists") == "on_disk" else "HNSW"
    later = f" ({kind}: skipped by every search now, space reclaimed by `retrieve index compact`)"
    values = select.summary()  # which values --where matched, when several (label=liver: kidney|liver too)
    print(
        f"removed {removed} images"
        + (f" ({values})" if values else "")
        + f"; index now holds {manifest.count}"
        + (later if manifest.params.get("removal") == "tombstone" else "")
    )


def index_compact(index: Path = typer.Option(..., "--index", "-i")):
    """Rewrite the shards without removed images and rebuild the FAISS index over the live ones."""
    from indexer.index_dir import compact_index_dir

    manifest, dropped = compact_index_dir(index)
    print(f"compacted: dropped {dropped} removed rows; {manifest.count} images in {len(manifest.shards)} shard(s)")


def index_info(index: Path = typer.Option(..., "--index", "-i"), as_json: bool = typer.Option(False, "--json")):
    """Print the index manifest and whether its files are intact (sizes; `index verify` checks content)."""
    from indexer.faiss_index import planned_search_device
    from indexer.index_dir import file_problems, read_manifest

    m = read_manifest(index)
    problems = file_problems(Path(index), m)
    device = planned_search_device(m.params, m.dim)
    if as_json:
        print(json.dumps({**json.loads(m.to_json()), "search_device": device, "problems": problems}, indent=2))
    else:
        fp = m.fingerprint
        weights = str(fp.get("weights_sha256", "?"))[:12]
        print(f"index:     {index}")
        print(f"images:    {m.count}  ({', '.join(f'{k} {v}' for k, v in m.labels.items())})")
        print(f"vectors:   {m.dim}-d, {m.metric}")
        print(f"kind:      {m.kind} {json.dumps(m.params)}")
        print(f"search:    {device} (queries without --no-gpu)")
        if m.lists_file:
            mb = int(m.lists_file.get("size", 0)) / 2**20
            print(f"lists:     on disk, {m.lists_file['name']} ({mb:.1f} MB), memory-mapped by queries")
        print(
            f"encoder:   {fp.get('encoder')} (weights sha256 {weights}), preprocess {json.dumps(fp.get('preprocess'))}"
        )
        print(f"created:   {m.created}   updated: {m.updated}   version {m.generation}")
        print("files:     " + ("DAMAGED: " + "; ".join(problems) if problems else "present, sizes as recorded"))
    if problems:
        raise typer.Exit(2)


def index_verify(index: Path = typer.Option(..., "--index", "-i")):
    """Check everything: SHA-256 of every file against the manifest, both files load, counts and dims agree."""
    from indexer.index_dir import verify_index_dir

    problems = verify_index_dir(index)
    for p in problems:
        echo_err(f"problem: {p}")
    if any(not p.startswith("no checksums") for p in problems):
        echo_err(f"--index {index}: damaged ({len(problems)} problem(s)); rebuild it")
        raise typer.Exit(2)
    print(f"--index {index}: ok (checksums, sizes, counts and dimensions agree)")
