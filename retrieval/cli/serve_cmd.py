"""`retrieve serve`: parse, read the token, hand over to retrieval.server (the HTTP API)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from retrieval.cli import options as opt
from retrieval.errors import RetrieveError
from retrieval.server.config import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_UPLOAD_MB, ServeConfig

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
    gpu: bool = opt.Gpu,
):
    """Serve the index over HTTP (FastAPI): POST /query, GET /items/{id}, /items/{id}/thumbnail, /health, /docs."""
    from retrieval.server.auth import read_token

    for origin in cors_origin:
        if not ORIGIN.match(origin):
            raise RetrieveError(f"--cors-origin {origin!r}: expected scheme://host[:port], e.g. https://viewer.example")
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
        use_gpu=gpu,
    )
    from retrieval.server.run import serve as run_server

    run_server(cfg)
