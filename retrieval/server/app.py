"""The HTTP API (FastAPI): routes parse and present; the engine calls the library as `retrieve query` does."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval import __version__
from retrieval.data.dicomweb import InstanceUnavailable, ServerUnreachable
from retrieval.errors import RetrieveError
from retrieval.server.config import MAX_K, THUMBNAIL_MAX_SIDE, ServeConfig
from retrieval.server.engine import Engine, Forbidden, NotFound
from retrieval.server.guard import Guard
from retrieval.server.uploads import SUFFIX_BY_KIND, UploadError, check_header, clean_name, sniff_kind

log = logging.getLogger(__name__)

DESCRIPTION = """Similar-case retrieval over one index. POST /query with an image (PNG, JPEG or DICOM) returns the
same JSON as `retrieve query --json`; POST /query-by-reference does the same for an instance on the index's PACS,
named by its study, series and instance UIDs (a viewer's "cases like the one on screen"). With an access token,
every endpoint but /health needs
`Authorization: Bearer <token>`. The suggested label is a vote of similar cases, not a diagnosis."""


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


class ReferenceQuery(BaseModel):
    """An instance on the PACS the index was synced from, and the options of POST /query."""

    study: str = Field(description="StudyInstanceUID", min_length=1, max_length=64)
    series: str = Field(description="SeriesInstanceUID", min_length=1, max_length=64)
    instance: str = Field(description="SOPInstanceUID", min_length=1, max_length=64)
    k: int = Field(10, ge=1, le=MAX_K, description="number of similar cases")
    where: list[str] = Field([], description="only candidates with COLUMN=VALUE")
    exclude_patient: list[str] = Field([], description="leave out these patients' images")
    include_self: bool = Field(False, description="keep the instance itself if it is indexed")
    vote: str = Field("majority", description="majority or similarity")
    group_by: str | None = Field(None, description="answer with cases: study, series or patient")
    agg: str = Field("max", description="a case's score from its images': max or mean")


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def _upload(_: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    statuses: list[tuple[type[Exception], int, str]] = [  # the library's errors as HTTP answers
        (NotFound, 404, ""),
        (Forbidden, 403, ""),
        (InstanceUnavailable, 404, "not on the PACS: "),
        (ServerUnreachable, 502, ""),
        (RetrieveError, 400, ""),
    ]
    for kind, status, prefix in statuses:

        async def _answer(_: Request, exc: Exception, status: int = status, prefix: str = prefix) -> JSONResponse:
            return _error(status, f"{prefix}{exc}")

        app.add_exception_handler(kind, _answer)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _one_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # logged with its traceback; the client gets one line
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return _error(500, "internal error (see the server's log)")


def create_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    """The app over a loaded engine, behind the guard (token, body limit, bounded queries) and optional CORS."""
    app = FastAPI(title="retrieve", version=__version__, description=DESCRIPTION)
    _handlers(app)

    @app.get(
        "/health",
        summary="Liveness and the index generation served (no token needed)",
        description="`generation` counts the index's versions (each `index add`, `remove` or `compact` makes "
        "one; the server serves a new one from the next request on); `stale: true` when the index changed on "
        "disk but its new version could not be opened, so an older one is still served (see the server's log).",
    )
    def health() -> dict[str, Any]:
        return engine.health()

    @app.post("/query", summary="Similar indexed cases for an uploaded image (the JSON of `retrieve query --json`)")
    def query(
        file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM (recognised by content)")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="number of similar cases")] = 10,
        where: Annotated[list[str], Form(description="only candidates with COLUMN=VALUE (repeatable)")] = [],  # noqa: B006
        exclude_patient: Annotated[list[str], Form(description="leave out this patient's images")] = [],  # noqa: B006
        include_self: Annotated[bool, Form(description="keep the query image itself if it is indexed")] = False,
        vote: Annotated[str, Form(description="majority or similarity")] = "majority",
        group_by: Annotated[str | None, Form(description="answer with cases: study, series or patient")] = None,
        agg: Annotated[str, Form(description="a case's score from its images': max or mean")] = "max",
    ) -> Any:
        name = clean_name(file.filename)
        kind = sniff_kind(file.file.read(132))
        if kind is None:
            raise UploadError(415, f"{name}: not a PNG, JPEG or DICOM file (by its content)")
        file.file.seek(0)
        with tempfile.TemporaryDirectory(prefix="retrieve-upload-") as tmp:
            path = Path(tmp) / f"upload{SUFFIX_BY_KIND[kind]}"
            with open(path, "wb") as out:
                shutil.copyfileobj(file.file, out)
            check_header(path, kind, name)
            return engine.query(path, name, k, exclude_patient, where, vote, include_self, group_by or None, agg)

    @app.post(
        "/query-by-reference",
        summary="Similar indexed cases for an instance on the index's PACS, by its UIDs (the JSON of POST /query)",
        responses={404: {"description": "no such instance on the PACS"}, 502: {"description": "PACS unreachable"}},
    )
    def query_by_reference(body: ReferenceQuery) -> Any:
        return engine.query_reference(
            body.study,
            body.series,
            body.instance,
            body.k,
            body.exclude_patient,
            body.where,
            body.vote,
            body.include_self,
            body.group_by or None,
            body.agg,
        )

    @app.get("/items/{item_id:path}/thumbnail", summary="An indexed image as PNG", response_class=Response)
    def thumbnail(item_id: str, size: Annotated[int, Query(ge=16, le=THUMBNAIL_MAX_SIDE)] = 256) -> Response:
        png = engine.thumbnail(item_id, size)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    @app.get("/items/{item_id:path}", summary="An indexed image's metadata (no patient names)")
    def item(item_id: str) -> dict[str, Any]:
        return engine.item(item_id)

    app.add_middleware(Guard, token=cfg.token, max_body=cfg.max_upload_bytes, max_concurrent=cfg.max_concurrent)
    if cfg.cors_origins:  # outside the guard, so a browser's preflight (which carries no token) is answered
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
