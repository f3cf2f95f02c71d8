"""`retrieve index build|add --dicomweb URL`: index a PACS over DICOMweb; parse, call retrieval.pacs, present."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrieval.cli.output import echo_err

if TYPE_CHECKING:
    from indexer.config import IndexConfig
    from retrieval.pacs import SyncOptions as SyncOptionsT
    from retrieval.pacs import SyncProgress, SyncResult
    from retrieval.pipeline import LoadedEncoder

Dicomweb = typer.Option(
    None,
    "--dicomweb",
    help="index a PACS: its DICOMweb root, e.g. https://pacs/dicom-web (credentials: RETRIEVE_DICOMWEB_TOKEN, "
    "or RETRIEVE_DICOMWEB_USER and RETRIEVE_DICOMWEB_PASSWORD, or --dicomweb-auth FILE)",
)
Study = typer.Option([], "--study", help="with --dicomweb: only this StudyInstanceUID (repeatable)")
Modality = typer.Option(None, "--modality", help="with --dicomweb: only series of this modality (US, CT, ...)")
Since = typer.Option(None, "--since", help="with --dicomweb: only studies on or after DATE (YYYY-MM-DD)")
BodyPart = typer.Option(None, "--body-part", help="with --dicomweb: only series of this BodyPartExamined")
Auth = typer.Option(None, "--dicomweb-auth", help="YAML/JSON file with token, or username and password (never printed)")
CommitEvery = typer.Option(
    None,
    "--commit-every",
    min=1,
    help="with --dicomweb: commit every N instances (an interrupted sync keeps them; default: once, at the end)",
)
ViewerUrl = typer.Option(
    None,
    "--viewer-url",
    help="link stored with each hit: a template with {base} {origin} {study} {series} {instance} "
    "(default: $RETRIEVE_VIEWER_URL, else {origin}/viewer?StudyInstanceUIDs={study}, OHIF's)",
)
Insecure = typer.Option(False, "--insecure", help="with --dicomweb: do not verify the server's TLS certificate")


def connection(
    url: str, auth: Path | None, insecure: bool, viewer_url: str | None, batch_size: int, gpu: bool, **sync: Any
) -> tuple[Any, SyncOptionsT]:
    """The server's configuration and the sync options (viewer template from the option, the environment or
    OHIF's); warns once when TLS verification is off. Extra keywords go to SyncOptions."""
    import os

    from retrieval.data.dicomweb import DEFAULT_VIEWER, VIEWER_ENV, server_config
    from retrieval.pacs import SyncOptions

    cfg = server_config(url, auth_file=auth, verify=not insecure)
    if insecure:
        echo_err(f"warning: --insecure: the TLS certificate of {cfg.url} is not verified")
    template = viewer_url or os.environ.get(VIEWER_ENV) or DEFAULT_VIEWER
    return cfg, SyncOptions(batch_size=batch_size, use_gpu=gpu, viewer_template=template, **sync)


def follow(events: Iterable[SyncProgress], quiet: bool, done: str = "indexed") -> SyncResult:
    """Show a progress bar of instances fetched (and `done`) while the library works; its final result."""
    from tqdm import tqdm

    bar = None
    result = None
    try:
        for ev in events:
            if ev.stage == "searched" and not quiet and ev.todo:
                bar = tqdm(total=ev.todo, desc="fetched", unit="inst", file=sys.stderr, leave=False)
            elif bar is not None and ev.stage in ("fetched", "indexed"):
                bar.update(ev.fetched - bar.n)
                bar.set_postfix({done: ev.indexed, "skipped": ev.skipped})
            result = ev.result or result
    finally:
        if bar is not None:
            bar.close()
    assert result is not None
    return result


def sync(
    url: str,
    index: Path,
    *,
    create: bool,
    studies: list[str],
    modality: str | None,
    since: str | None,
    body_part: str | None,
    auth: Path | None,
    commit_every: int | None,
    viewer_url: str | None,
    insecure: bool,
    quiet: bool,
    batch_size: int,
    gpu: bool,
    load: Callable[[], LoadedEncoder] | None = None,
    index_cfg: IndexConfig | None = None,
    overwrite: bool = False,
) -> None:
    """Index a DICOMweb server (build: `load` gives the encoder; add: the index's own), showing progress."""
    from indexer.index_dir import check_can_build, read_manifest
    from retrieval.data.dicomweb import DicomWebSource, Filters
    from retrieval.pacs import sync_dicomweb
    from retrieval.pipeline import encoder_for_index, report_skipped

    filters = Filters(tuple(studies), modality, since, body_part)
    cfg, opts = connection(url, auth, insecure, viewer_url, batch_size, gpu, commit_every=commit_every)
    if create:
        check_can_build(index, overwrite)
    else:
        m = read_manifest(index)
    t0 = time.perf_counter()
    with DicomWebSource(cfg) as source:
        source.check()  # before the encoder is loaded: a wrong URL or password costs nothing
        if create:
            assert load is not None
            loaded = load()
        else:
            loaded = encoder_for_index(m.fingerprint, m.encoder_spec, f"--index {index}")
        result = follow(sync_dicomweb(source, filters, index, loaded, create, index_cfg, overwrite, opts), quiet)
    report_skipped(result.skipped)
    holds = f"; index now holds {result.manifest.count}" if result.manifest is not None else "; index unchanged"
    print(
        f"{cfg.url}: {result.found} instance(s) match, {result.already} already indexed; fetched {result.fetched}, "
        f"indexed {result.indexed} ({result.rows} images) in {time.perf_counter() - t0:.1f} s"
        + (f"; skipped {len(result.skipped)}" if result.skipped else "")
        + holds
        + f" -> {index}"
    )
