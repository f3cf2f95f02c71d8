"""The HTTP API (FastAPI): routes parse and present; the engine calls the library as `retrieve query` does."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile, params
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval import __version__
from retrieval.data.dicomweb import UID, InstanceUnavailable, ServerUnreachable
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


# the choices of `retrieve query --vote`, `--group-by` and `--agg` (retrieval.vote, retrieval.cases; a test
# checks they agree), as enums in the OpenAPI description: anything else is refused by validation (422)
Vote = Literal["majority", "similarity"]
GroupBy = Literal["study", "series", "patient"]
Agg = Literal["max", "mean"]


class ErrorBody(BaseModel):
    """Every error answer: one line saying what is wrong, never a traceback."""

    detail: str = Field(description="what is wrong, in one line")


ERRORS: dict[int, str] = {
    400: "a request the index cannot answer: a bad `where` or `exclude_patient`, `k` over the number of images "
    "in the index, an unknown field or query parameter, more than one file",
    401: "missing or wrong access token (when the server has one)",
    403: "the item's file lies outside the data root",
    404: "no such item, or its file is missing",
    408: "the request body did not arrive within 60 s",
    413: "the request body is over the upload limit, or the image over the pixel or frame limits",
    415: "not a PNG, JPEG or DICOM file (by its content)",
    422: "a field of the wrong type or outside its range or choices, or an image that cannot be read",
    500: "an internal error (logged by the server)",
    502: "the index's PACS cannot be reached",
    503: "busy: every query slot is taken; try again after Retry-After seconds",
}


def _declared(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the body it really has (ErrorBody)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorBody, "description": descriptions.get(f"e{status}", ERRORS[status])}
    return out


# the library's messages name `retrieve query`'s options; over HTTP they are these form (and JSON) fields
CLI_OPTION = re.compile(r"--(where|exclude-patient|group-by|agg|vote|k|include-self)\b")


def http_terms(detail: str) -> str:
    """A library message with its command-line options named as the HTTP fields (--group-by -> group_by)."""
    return CLI_OPTION.sub(lambda m: m.group(1).replace("-", "_"), detail)


def _error(
    status: int, detail: str, headers: Mapping[str, str] | None = None, hidden: Mapping[str, str] | None = None
) -> JSONResponse:
    """A one-line JSON error; `hidden` maps the server's own folders (as absolute paths) to the words a client
    reads instead, so a library message never shows where the index and the data lie on the server."""
    for path, name in sorted((hidden or {}).items(), key=lambda item: -len(item[0])):
        detail = detail.replace(path, name)
    return JSONResponse({"detail": http_terms(detail)}, status_code=status, headers=headers)


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "string_pattern_mismatch":  # the UIDs of a query by reference
            msg = "not a DICOM UID (digits and dots)"
        if e.get("type") == "json_invalid":  # its loc is the character position, not a field
            reason = str((e.get("ctx") or {}).get("error", "")).strip()
            pos = e.get("loc", ("", "?"))[-1]
            parts.append(f"the body is not valid JSON ({reason + ' ' if reason else ''}at character {pos})")
            continue
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def _names(names: list[str], most: int = 5) -> str:
    """Client-given names for a message: quoted, printable, each and their number bounded."""
    shown = [repr("".join(c for c in n if c.isprintable())[:40]) for n in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def _unknown(what: str, names: list[str], known: list[str]) -> RetrieveError:
    plural = "s" if len(names) > 1 else ""
    takes = f"the {what}s are: {', '.join(known)}" if known else f"this endpoint takes no {what}s"
    return RetrieveError(f"unknown {what}{plural} {_names(names)} ({takes})")


async def _known_parameters(request: Request) -> None:
    """Query-string parameters and form fields the route does not take are refused (400, named), not ignored:
    `POST /query?k=5` would otherwise answer with the default k without a word."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    fields = sorted({f.alias for f in dependant.body_params if isinstance(f.field_info, params.Form)})
    known = sorted({f.alias for f in dependant.query_params})
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        error = _unknown("query parameter", unknown, known)
        if set(unknown) <= set(fields):
            error = RetrieveError(f"{error}: send {', '.join(unknown)} as form fields, not in the URL")
        raise error
    if fields:
        unknown = sorted(set((await request.form()).keys()) - set(fields))
        if unknown:
            raise _unknown("form field", unknown, fields)


async def _one_file(request: Request) -> None:
    """POST /query takes one image: several `file` parts are refused, not reduced to the last one, and a
    `file` sent as a text field is named as such (not as a Python class). The form is FastAPI's, parsed once."""
    files = (await request.form()).getlist("file")
    if len(files) > 1:
        raise UploadError(400, f"{len(files)} files in one request: send one image per request (field file)")
    if files and isinstance(files[0], str):
        raise UploadError(422, "file: a text field, not a file: send the image as a file part with a filename")


def _with_reason(exc: StarletteHTTPException) -> str:
    """The exception's detail, and for a body the multipart parser refused, the parser's reason (Starlette
    says only "Invalid multipart data.")."""
    detail = str(exc.detail)
    cause: BaseException | None = exc
    for _ in range(4):  # HTTPException <- MultiPartException <- the parser's own error
        cause = cause.__cause__ or cause.__context__ if cause is not None else None
        if cause is not None and type(cause).__module__.split(".")[0] in ("python_multipart", "multipart"):
            reason = " ".join(str(cause).split())[:200] or type(cause).__name__
            if "header size" in reason:
                reason += ": a part's header, its file name included, is too long (send a shorter file name)"
            return f"{detail.rstrip('.')}: {reason}"
    return detail


def _no_null(schema: dict[str, Any]) -> None:
    """A form field's schema without `null`, which a form cannot send (an absent or empty field is None)."""
    choices = [s for s in schema.pop("anyOf", []) if s.get("type") != "null"]
    if len(choices) == 1:
        schema.update(choices[0])


def _uid(what: str) -> Any:
    return Field(description=f"{what} (digits and dots)", min_length=1, max_length=64, pattern=UID.pattern)


class ReferenceQuery(BaseModel):
    """An instance on the PACS the index was synced from, and the options of POST /query."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is refused (400), not ignored

    study: str = _uid("StudyInstanceUID")
    series: str = _uid("SeriesInstanceUID")
    instance: str = _uid("SOPInstanceUID")
    k: int = Field(10, ge=1, le=MAX_K, description="number of similar cases")
    where: list[str] = Field([], description="only candidates with COLUMN=VALUE")
    exclude_patient: list[str] = Field([], description="leave out these patients' images")
    include_self: bool = Field(False, description="keep the instance itself if it is indexed")
    vote: Vote = Field("majority", description="how the similar cases vote for a label")
    group_by: GroupBy | None = Field(None, description="answer with cases (study, series or patient), not images")
    agg: Agg = Field("max", description="a case's score from its images' scores")

    @field_validator("group_by", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


def _handlers(app: FastAPI, hidden: Callable[[], Mapping[str, str]]) -> None:
    @app.exception_handler(UploadError)
    async def _upload(_: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc), hidden=hidden())

    statuses: list[tuple[type[Exception], int, str]] = [  # the library's errors as HTTP answers
        (NotFound, 404, ""),
        (Forbidden, 403, ""),
        (InstanceUnavailable, 404, "not on the PACS: "),
        (ServerUnreachable, 502, ""),
        (RetrieveError, 400, ""),
    ]
    for kind, status, prefix in statuses:

        async def _answer(_: Request, exc: Exception, status: int = status, prefix: str = prefix) -> JSONResponse:
            return _error(status, f"{prefix}{exc}", hidden=hidden())

        app.add_exception_handler(kind, _answer)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        extra = [str(e["loc"][-1]) for e in exc.errors() if e.get("type") == "extra_forbidden" and e.get("loc")]
        if extra:  # a JSON body's unknown fields: refused like unknown form fields
            return _error(400, str(_unknown("field", extra, list(ReferenceQuery.model_fields))))
        return _error(422, _one_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, _with_reason(exc), exc.headers, hidden())  # e.g. a 405's Allow

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # logged with its traceback; the client gets one line
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return _error(500, "internal error (see the server's log)")


def _honest_openapi(app: FastAPI) -> None:
    """The OpenAPI description without FastAPI's default 422 (a list of error objects, which this server
    never sends: its 422 is an ErrorBody, declared by each route that can answer it)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    answer = operation.get("responses", {}).get("422", {})
                    if "HTTPValidationError" in str(answer.get("content", "")):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    """The app over a loaded engine, behind the guard (token, body limit, bounded queries) and optional CORS."""
    app = FastAPI(title="retrieve", version=__version__, description=DESCRIPTION)

    def hidden() -> dict[str, str]:  # the data root can change with a relocated index: read at each error
        out = {str(engine.data_root): "the data root"}
        for index in {str(cfg.index.resolve()), *([str(cfg.index)] if cfg.index.is_absolute() else [])}:
            out.update({f"--index {index}": "the index", index: "the index"})
        return out

    _handlers(app, hidden)

    @app.get(
        "/health",
        summary="Liveness and the index generation served (no token needed)",
        description="`generation` counts the index's versions (each `index add`, `remove` or `compact` makes "
        "one; the server serves a new one from the next request on); `stale: true` when the index changed on "
        "disk but its new version could not be opened, so an older one is still served (see the server's log).",
    )
    def health() -> dict[str, Any]:
        return engine.health()

    strict = [Depends(_known_parameters)]  # every route but /health

    @app.post(
        "/query",
        summary="Similar indexed cases for an uploaded image (the JSON of `retrieve query --json`)",
        responses=_declared(400, 401, 408, 413, 415, 422, 500, 503),
        dependencies=[*strict, Depends(_one_file)],
    )
    def query(
        file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM (recognised by content)")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="number of similar cases")] = 10,
        where: Annotated[list[str], Form(description="only candidates with COLUMN=VALUE (repeatable)")] = [],  # noqa: B006
        exclude_patient: Annotated[list[str], Form(description="leave out this patient's images")] = [],  # noqa: B006
        include_self: Annotated[bool, Form(description="keep the query image itself if it is indexed")] = False,
        vote: Annotated[Vote, Form(description="how the similar cases vote for a label")] = "majority",
        group_by: Annotated[
            GroupBy | None,
            Form(
                description="answer with cases (study, series or patient), not images; absent or empty: images",
                json_schema_extra=_no_null,
            ),
        ] = None,
        agg: Annotated[Agg, Form(description="a case's score from its images' scores")] = "max",
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
            check_header(path, kind, name, cfg.max_query_frames)
            return engine.query(path, name, k, exclude_patient, where, vote, include_self, group_by or None, agg)

    @app.post(
        "/query-by-reference",
        summary="Similar indexed cases for an instance on the index's PACS, by its UIDs (the JSON of POST /query)",
        responses=_declared(400, 401, 404, 408, 413, 422, 500, 502, 503, e404="no such instance on the PACS"),
        dependencies=strict,
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

    @app.get(
        "/items/{item_id:path}/thumbnail",
        summary="An indexed image as PNG",
        response_class=Response,
        dependencies=strict,
        responses={
            200: {"description": "the image as PNG", "content": {"image/png": {"schema": {"type": "string"}}}},
            **_declared(
                400, 401, 403, 404, 408, 413, 422, 500, 502, e400="the item is on a PACS the index does not record"
            ),
        },
    )
    def thumbnail(item_id: str, size: Annotated[int, Query(ge=16, le=THUMBNAIL_MAX_SIDE)] = 256) -> Response:
        png = engine.thumbnail(item_id, size)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    @app.get(
        "/items/{item_id:path}",
        summary="An indexed image's metadata (no patient names)",
        responses=_declared(400, 401, 404, 408, 413, 500),
        dependencies=strict,
    )
    def item(item_id: str) -> dict[str, Any]:
        return engine.item(item_id)

    _honest_openapi(app)
    app.add_middleware(Guard, token=cfg.token, max_body=cfg.max_upload_bytes, max_concurrent=cfg.max_concurrent)
    if cfg.cors_origins:  # outside the guard, so a browser's preflight (which carries no token) is answered
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
