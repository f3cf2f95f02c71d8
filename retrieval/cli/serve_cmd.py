"""`retrieve serve`: parse, read the token, hand over to retrieval.server (the HTTP API)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.errors import RetrieveError
from retrieval.server.config import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_QUERY_FRAMES,
    DEFAULT_MAX_UPLOAD_MB,
    PacsSettings,
    ServeConfig,
)

ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def serve(
    index: Path = typer.Option(..., "--index", "-i"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to listen on; beyond loopback an access token is required"
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    token_env: str | None = typer.Option(
        None, "--token-env", help="name of the environment variable that holds the access token"
    ),
    token_file: Path | None = typer.Option(None, "--token-file", help="file that holds the access token"),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="listen beyond loopback without a token (anyone who can reach it gets in)"
    ),
    cors_origin: list[str] = typer.Option(
        [], "--cors-origin", help="let pages from this origin call the API (repeatable); CORS is off otherwise"
    ),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="the folder that holds the indexed files now; no file outside it is read"
    ),
    max_upload_mb: int = typer.Option(DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb", min=1, help="largest request body"),
    max_concurrent: int = typer.Option(
        DEFAULT_MAX_CONCURRENT, "--max-concurrent", min=1, help="queries in flight; more are answered 503"
    ),
    max_query_frames: int = typer.Option(
        DEFAULT_MAX_QUERY_FRAMES,
        "--max-query-frames",
        min=1,
        help="frames one uploaded clip may query with (each is a query through the encoder); more: 413",
    ),
    pacs_timeout: float = typer.Option(
        PacsSettings.timeout, "--pacs-timeout", help="seconds per request to the index's PACS (DICOMweb)"
    ),
    pacs_retries: int = typer.Option(
        PacsSettings.retries, "--pacs-retries", min=0, help="retries of a failed PACS request, with backoff"
    ),
    thumbnail_cache: Path | None = typer.Option(
        None, "--thumbnail-cache", help="folder for thumbnails of PACS images (default: a temporary one)"
    ),
    thumbnail_cache_mb: float = typer.Option(
        PacsSettings.thumbnail_cache_bytes / (1 << 20),
        "--thumbnail-cache-mb",
        help="size limit of the thumbnail cache; least recently used thumbnails go beyond it",
    ),
    viewer_url: str | None = typer.Option(
        None,
        "--viewer-url",
        help="rebuild the viewer link of PACS hits from this template ({base} {origin} {study} {series} {instance}); "
        "default: the link stored at indexing",
    ),
    gpu: bool = opt.Gpu,
):
    """Serve the index over HTTP (FastAPI): POST /query, GET /items/{id}, /items/{id}/thumbnail, /health, /docs."""
    from retrieval.data.dicomweb import check_viewer_template
    from retrieval.server.auth import read_token

    for origin in cors_origin:
        if not ORIGIN.match(origin):
            raise RetrieveError(f"--cors-origin {origin!r}: expected scheme://host[:port], e.g. https://viewer.example")
    if pacs_timeout <= 0:
        raise RetrieveError(f"--pacs-timeout {pacs_timeout}: give a positive number of seconds")
    if thumbnail_cache_mb <= 0:
        raise RetrieveError(f"--thumbnail-cache-mb {thumbnail_cache_mb}: give a positive size")
    if thumbnail_cache is not None and thumbnail_cache.exists() and not thumbnail_cache.is_dir():
        raise RetrieveError(f"--thumbnail-cache {thumbnail_cache}: is a file; give a folder")
    if viewer_url is not None:
        check_viewer_template(viewer_url)
    cfg = ServeConfig(
        index=index,
        host=host,
        port=port,
        token=read_token(token_env, token_file),
        insecure_no_auth=insecure_no_auth,
        cors_origins=tuple(cors_origin),
        data_root=data_root,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        max_concurrent=max_concurrent,
        max_query_frames=max_query_frames,
        use_gpu=gpu,
        pacs=PacsSettings(
            timeout=pacs_timeout,
            retries=pacs_retries,
            thumbnail_cache=thumbnail_cache,
            thumbnail_cache_bytes=int(thumbnail_cache_mb * (1 << 20)),
            viewer_template=viewer_url,
        ),
    )
    from retrieval.server.run import serve as run_server

    run_server(cfg)
