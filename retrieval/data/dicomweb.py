"""A DICOMweb server as a source of images: QIDO-RS to search, WADO-RS to fetch (`dicomweb-client`).

An instance on a server is named in index rows by a reference that holds no server address and no
credentials: ``dicomweb://<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>``; the server's
base URL (credentials stripped) is kept next to it in the row's `source_url` column.

Credentials come from the environment (RETRIEVE_DICOMWEB_TOKEN for a bearer token, or
RETRIEVE_DICOMWEB_USER and RETRIEVE_DICOMWEB_PASSWORD for basic authentication) or from a config file
(YAML or JSON: ``token: ...`` or ``username: ...`` and ``password: ...``; its path in
RETRIEVE_DICOMWEB_AUTH or given by the caller). They are sent as an HTTP header and never written to
a message, a log line or an index. TLS certificates are verified unless the caller says otherwise;
every request has a timeout, and failed connections or busy answers (429, 502, 503, 504) are retried
with exponential backoff.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from retrieval.errors import RetrieveError

log = logging.getLogger(__name__)

SCHEME = "dicomweb://"
TOKEN_ENV = "RETRIEVE_DICOMWEB_TOKEN"
USER_ENV = "RETRIEVE_DICOMWEB_USER"
PASSWORD_ENV = "RETRIEVE_DICOMWEB_PASSWORD"
AUTH_FILE_ENV = "RETRIEVE_DICOMWEB_AUTH"
VIEWER_ENV = "RETRIEVE_VIEWER_URL"
DEFAULT_VIEWER = "{origin}/viewer?StudyInstanceUIDs={study}"  # OHIF's route for one study
RETRY_STATUS = (429, 502, 503, 504)
EXPLICIT_LE = "1.2.840.10008.1.2.1"  # a transfer syntax every reader decodes; servers transcode to it
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# QIDO-RS attribute tags (DICOM JSON keys)
T_STUDY, T_SERIES, T_SOP = "0020000D", "0020000E", "00080018"
T_PATIENT_ID, T_STUDY_DATE, T_ACCESSION = "00100020", "00080020", "00080050"
T_MODALITY, T_BODY_PART, T_FRAMES = "00080060", "00180015", "00280008"


def instance_ref(study: str, series: str, sop: str) -> str:
    """The reference an index row keeps for an instance on a DICOMweb server."""
    return f"{SCHEME}{study}/{series}/{sop}"


def parse_ref(ref: str) -> tuple[str, str, str] | None:
    """(study, series, sop) of a `dicomweb://` reference; None for anything else (a local path)."""
    if not str(ref).startswith(SCHEME):
        return None
    parts = str(ref)[len(SCHEME) :].split("/")
    if len(parts) != 3 or not all(UID.match(p) for p in parts):
        return None
    return parts[0], parts[1], parts[2]


# --- credentials and server settings ---------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Basic (username + secret) or bearer (secret only); the secret never appears in repr()."""

    kind: str  # "basic" or "bearer"
    secret: str = field(repr=False)
    username: str | None = None

    def header(self) -> dict[str, str]:
        import base64

        if self.kind == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        raw = f"{self.username or ''}:{self.secret}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


def _from_mapping(values: Mapping[str, Any], where: str) -> Credentials:
    token, user, password = values.get("token"), values.get("username"), values.get("password")
    if token:
        return Credentials("bearer", str(token))
    if user and password is not None:
        return Credentials("basic", str(password), str(user))
    raise RetrieveError(f"{where}: give either 'token' (bearer) or 'username' and 'password' (basic)")


def read_auth_file(path: str | Path) -> Credentials:
    """Credentials from a YAML or JSON file; errors name the file and the keys, never a value."""
    import yaml

    p = Path(path).expanduser()
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RetrieveError(f"{p}: cannot read the DICOMweb credentials file ({type(exc).__name__})") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise RetrieveError(f"{p}: the DICOMweb credentials file is not YAML or JSON") from None
    if not isinstance(raw, dict):
        raise RetrieveError(f"{p}: the DICOMweb credentials file must hold keys (token, or username and password)")
    return _from_mapping(raw, str(p))


def load_credentials(auth_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> Credentials | None:
    """A given file, else RETRIEVE_DICOMWEB_AUTH's file, else the token or user/password variables."""
    env = os.environ if env is None else env
    if auth_file is not None:
        return read_auth_file(auth_file)
    if env.get(AUTH_FILE_ENV):
        return read_auth_file(env[AUTH_FILE_ENV])
    if env.get(TOKEN_ENV):
        return Credentials("bearer", env[TOKEN_ENV])
    if env.get(USER_ENV):
        if PASSWORD_ENV not in env:
            raise RetrieveError(f"{USER_ENV} is set but {PASSWORD_ENV} is not")
        return Credentials("basic", env[PASSWORD_ENV], env[USER_ENV])
    return None


def split_url(url: str) -> tuple[str, Credentials | None]:
    """The URL without user:password@ (which becomes basic credentials); checks the scheme and host."""
    text = str(url).strip()
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise RetrieveError("--dicomweb: not a valid URL (give http(s)://host[:port]/path)") from None
    if parts.scheme not in ("http", "https") or not host:
        shown = text if "@" not in text else "(a URL with credentials)"
        raise RetrieveError(f"--dicomweb {shown}: not an http(s) URL (give http(s)://host[:port]/path)")
    creds = None
    if parts.username is not None:
        from urllib.parse import unquote

        creds = Credentials("basic", unquote(parts.password or ""), unquote(parts.username))
    netloc = host if ":" not in host else f"[{host}]"
    netloc += f":{port}" if port else ""
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, creds


@dataclass(frozen=True)
class ServerConfig:
    url: str  # base URL of the DICOMweb service, without credentials
    credentials: Credentials | None = field(default=None, repr=False)
    verify: bool | str = True  # TLS: verify certificates (or the path of a CA bundle)
    timeout: float = 30.0  # seconds per request (connect and read)
    retries: int = 3  # retries of a failed connection or a busy answer, with exponential backoff
    backoff: float = 0.5  # seconds before the first retry; doubled each time

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def server_config(
    url: str,
    auth_file: str | Path | None = None,
    verify: bool | str = True,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    env: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Settings for a server: credentials in the URL, else a file, else the environment."""
    clean, in_url = split_url(url)
    creds = in_url or load_credentials(auth_file, env)
    if timeout <= 0 or retries < 0 or backoff < 0:
        raise RetrieveError("--dicomweb: timeout must be positive, retries and backoff not negative")
    return ServerConfig(clean, creds, verify, timeout, retries, backoff)


# --- search filters --------------------------------------------------------------------------------


def parse_date(text: str, option: str = "--since") -> str:
    """YYYY-MM-DD or YYYYMMDD -> YYYYMMDD (a real calendar date)."""
    raw = str(text).strip()
    digits = raw.replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise RetrieveError(f"{option} {raw[:30]!r}: expected a date as YYYY-MM-DD or YYYYMMDD") from None
    return digits


@dataclass(frozen=True)
class Filters:
    """What to index: studies by UID, a modality, studies on or after a date, a body part (all optional)."""

    studies: tuple[str, ...] = ()
    modality: str | None = None
    since: str | None = None  # YYYYMMDD
    body_part: str | None = None

    def __post_init__(self) -> None:
        for uid in self.studies:
            if not UID.match(uid):
                raise RetrieveError(f"--study {uid[:70]!r}: not a DICOM UID (digits and dots)")
        if self.since is not None:
            object.__setattr__(self, "since", parse_date(self.since))
        if self.modality is not None:
            object.__setattr__(self, "modality", self.modality.strip().upper())
        if self.body_part is not None:
            object.__setattr__(self, "body_part", self.body_part.strip().upper())


@dataclass(frozen=True)
class RemoteInstance:
    """One instance found by QIDO-RS, with the identity columns an index row stores."""

    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str | None = None
    modality: str | None = None
    body_part: str | None = None
    study_date: str | None = None
    accession: str | None = None

    @property
    def ref(self) -> str:
        return instance_ref(self.study_uid, self.series_uid, self.sop_uid)

    def columns(self) -> dict[str, str | None]:
        return {
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_uid": self.sop_uid,
            "modality": self.modality,
            "body_part": self.body_part,
            "study_date": self.study_date,
            "accession": self.accession,
        }


def _value(attrs: Mapping[str, Any], tag: str) -> str | None:
    """The first value of a DICOM JSON attribute as text (None when absent or empty)."""
    entry = attrs.get(tag)
    if not isinstance(entry, Mapping):
        return None
    values = entry.get("Value") or []
    if not values:
        return None
    v = values[0]
    if isinstance(v, Mapping):  # a person name; never used for anything we keep
        return None
    text = str(v).strip()
    return text or None


# --- the client ------------------------------------------------------------------------------------


class ServerUnreachable(RetrieveError):
    """The server cannot be reached or keeps failing (after the retries): a sync stops here."""


class InstanceUnavailable(RetrieveError):
    """One instance could not be fetched (the server answered, but not with it): skipped and counted."""


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"https?://\S+", "", text)  # URLs in library messages may carry query strings
    return f"{type(exc).__name__}: {text[:120]}".rstrip(": ")


class DicomWebSource:
    """QIDO-RS and WADO-RS against one server, with timeouts, retries and the given credentials."""

    def __init__(self, cfg: ServerConfig):
        try:
            import requests
            from dicomweb_client.api import DICOMwebClient
        except ImportError:
            raise RetrieveError(
                "--dicomweb needs the DICOMweb client: pip install 'retrieve[dicomweb]' (dicomweb-client)"
            ) from None
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.cfg = cfg
        session = requests.Session()
        session.verify = cfg.verify
        retry = Retry(
            total=cfg.retries,
            connect=cfg.retries,
            read=cfg.retries,
            status=cfg.retries,
            backoff_factor=cfg.backoff,
            status_forcelist=RETRY_STATUS,
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if cfg.credentials is not None:
            session.headers.update(cfg.credentials.header())
        self.session = session
        self.client = DICOMwebClient(cfg.url, session=session, timeout=cfg.timeout)
        self.client.set_http_retry_params(retry=False)  # the session's adapter retries, with backoff

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DicomWebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a client call; failures become one-line errors naming the server, never a credential."""
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError:
            raise ServerUnreachable(
                f"--dicomweb {self.cfg.url}: TLS certificate not trusted (give the CA bundle, or turn "
                "verification off only for a server you trust)"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise ServerUnreachable(
                f"--dicomweb {self.cfg.url}: cannot reach the server after {self.cfg.retries} retries "
                f"({type(exc).__name__})"
            ) from None
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                how = "the credentials were refused" if self.cfg.credentials else "it asks for credentials"
                raise ServerUnreachable(
                    f"--dicomweb {self.cfg.url}: {how} (HTTP {status}); set {TOKEN_ENV}, or {USER_ENV} and "
                    f"{PASSWORD_ENV}, or a credentials file in {AUTH_FILE_ENV}"
                ) from None
            if status in RETRY_STATUS or status >= 500:
                raise ServerUnreachable(f"--dicomweb {self.cfg.url}: {what} failed with HTTP {status}") from None
            raise InstanceUnavailable(f"{what}: HTTP {status}") from None
        except RetrieveError:
            raise
        except Exception as exc:  # the client parses what the server sent: a bad answer is the server's
            raise InstanceUnavailable(f"{what}: unreadable answer ({_brief(exc)})") from None

    def check(self) -> None:
        """One cheap QIDO-RS request: a one-line error when the server is not a usable DICOMweb service."""
        try:
            self._call("search", self.client.search_for_studies, limit=1, fields=[T_STUDY])
        except InstanceUnavailable as exc:
            raise RetrieveError(
                f"--dicomweb {self.cfg.url}: not a DICOMweb (QIDO-RS) service ({exc}); give the DICOMweb "
                "root, e.g. http://host:8042/dicom-web"
            ) from None

    def search(self, filters: Filters) -> list[RemoteInstance]:
        """QIDO-RS: studies (UIDs, date) -> their instances (modality, body part), in server order.

        The filters are sent to the server and checked again on what it answers, since servers differ
        in which attributes they match.
        """
        study_filters: dict[str, Any] = {}
        if filters.since:
            study_filters["StudyDate"] = f"{filters.since}-"
        if filters.studies:
            found: list[dict] = []
            for wanted in filters.studies:
                found += self._studies({**study_filters, "StudyInstanceUID": wanted})
        else:
            found = self._studies(study_filters)
        out: list[RemoteInstance] = []
        seen: set[str] = set()
        for study in found:
            uid = _value(study, T_STUDY)
            if uid is None or uid in seen:
                continue
            seen.add(uid)
            date_ = _value(study, T_STUDY_DATE)
            if filters.since and (date_ is None or date_[:8] < filters.since):
                continue
            out += self._instances_of_study(uid, study, filters)
        return out

    def _studies(self, search_filters: dict[str, Any]) -> list[dict]:
        return list(
            self._call(
                "search for studies",
                self.client.search_for_studies,
                search_filters=search_filters,
                fields=[T_STUDY_DATE, T_ACCESSION, T_PATIENT_ID],
                get_remaining=True,
            )
        )

    def _instances_of_study(self, study_uid: str, study: Mapping[str, Any], filters: Filters) -> list[RemoteInstance]:
        """One QIDO-RS request per study: its instances, with the series attributes the filters need."""
        wanted: dict[str, Any] = {}
        if filters.modality:
            wanted["Modality"] = filters.modality
        if filters.body_part:
            wanted["BodyPartExamined"] = filters.body_part
        instances = self._call(
            f"search for the instances of study {study_uid}",
            self.client.search_for_instances,
            study_instance_uid=study_uid,
            search_filters=wanted,
            fields=[T_SERIES, T_MODALITY, T_BODY_PART, T_PATIENT_ID],
            get_remaining=True,
        )
        out = []
        for inst in instances:
            sop, series_uid = _value(inst, T_SOP), _value(inst, T_SERIES)
            modality, body_part = _value(inst, T_MODALITY), _value(inst, T_BODY_PART)
            if sop is None or series_uid is None:
                continue
            if filters.modality and (modality or "").upper() != filters.modality:
                continue
            if filters.body_part and (body_part or "").upper() != filters.body_part:
                continue
            out.append(
                RemoteInstance(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=sop,
                    patient_id=_value(inst, T_PATIENT_ID) or _value(study, T_PATIENT_ID),
                    modality=modality,
                    body_part=body_part,
                    study_date=_value(study, T_STUDY_DATE),
                    accession=_value(study, T_ACCESSION),
                )
            )
        return out

    def fetch(self, study: str, series: str, sop: str, transfer_syntax: str = "*") -> bytes:
        """WADO-RS: one instance's DICOM file, as the server stores it ("*") or in a given transfer syntax.

        Raises InstanceUnavailable (skip it) or ServerUnreachable (stop).
        """
        ref = instance_ref(study, series, sop)
        return bytes(self._call(ref, self._get_instance, study, series, sop, transfer_syntax))

    def _get_instance(self, study: str, series: str, sop: str, transfer_syntax: str) -> bytes:
        url = f"{self.cfg.url}/studies/{study}/series/{series}/instances/{sop}"
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={transfer_syntax}'
        resp = self.session.get(url, headers={"Accept": accept}, timeout=self.cfg.timeout)
        resp.raise_for_status()
        parts = multipart_parts(resp.content, resp.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise ValueError(f"expected one DICOM part, got {len(parts)}")
        return parts[0]

    def rendered(self, study: str, series: str, sop: str, frame: int | None = None) -> bytes:
        """WADO-RS rendered: a PNG of the instance (or of one frame, 0-based) made by the server."""
        what = f"{instance_ref(study, series, sop)} (rendered)"
        png = ("image/png",)
        if frame is None:
            data = self._call(what, self.client.retrieve_instance_rendered, study, series, sop, media_types=png)
        else:
            fn = self.client.retrieve_instance_frames_rendered
            data = self._call(what, fn, study, series, sop, [frame + 1], media_types=png)
        return bytes(data)


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2046), byte for byte."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/") or m is None:
        raise ValueError(f"not a multipart answer ({content_type.split(';')[0] or 'no content type'})")
    delimiter = b"--" + m.group(1).strip().encode("latin-1")
    chunks = body.split(b"\r\n" + delimiter)
    first = chunks[0]
    chunks[0] = first[first.index(delimiter) + len(delimiter) :] if delimiter in first else first
    parts = []
    for chunk in chunks:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        _, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part without headers")
        parts.append(data)
    return parts


def viewer_link(template: str | None, cfg_url: str, study: str, series: str, sop: str) -> str | None:
    """The template with {base}, {origin}, {study}, {series} and {instance} filled in."""
    if not template:
        return None
    parts = urlsplit(cfg_url)
    origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    try:
        return template.format(base=cfg_url, origin=origin, study=study, series=series, instance=sop)
    except (KeyError, IndexError, ValueError) as exc:
        raise RetrieveError(
            f"--viewer-url {template!r}: bad template ({type(exc).__name__}: {exc}); "
            "use {base}, {origin}, {study}, {series}, {instance}"
        ) from None


def check_viewer_template(template: str) -> str:
    """The template itself, or a one-line error naming the bad placeholder (before any work is done)."""
    viewer_link(template, "https://pacs.invalid/dicom-web", "1.2", "1.2.3", "1.2.3.4")
    return template


def relink(hits: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Query-time links: each hit from a DICOMweb server gets `viewer_url` from `template` (others untouched)."""
    for hit in hits:
        url, study = hit.get("source_url"), hit.get("study_uid")
        if url and study:
            series, sop = hit.get("series_uid") or "", hit.get("sop_uid") or ""
            hit["viewer_url"] = viewer_link(template, str(url), str(study), str(series), str(sop))
    return hits


# --- thumbnails of hits that are not on local disk ------------------------------------------------


class ThumbnailCache:
    """PNG thumbnails of remote instances in a folder, at most `max_bytes` in all (least recently used go).

    A thumbnail is asked of the server (WADO-RS rendered); where the server cannot render, the
    instance is fetched and decoded by the project's DICOM reader.
    """

    def __init__(self, folder: str | Path, max_bytes: int = 64 << 20, size: int = 256):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.size = int(size)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, url: str, ref: str, frame: int | None) -> Path:
        key = hashlib.sha256(f"{url}|{ref}|{frame}|{self.size}".encode()).hexdigest()[:32]
        return self.folder / f"{key}.png"

    def get(self, source: DicomWebSource, ref: str, frame: int | None = None) -> Path:
        """The thumbnail's file (fetched on a miss); raises InstanceUnavailable or ServerUnreachable."""
        uids = parse_ref(ref)
        if uids is None:
            raise RetrieveError(f"{ref}: not a {SCHEME} reference")
        path = self._path(source.cfg.url, ref, frame)
        if path.is_file():
            os.utime(path)  # recently used
            return path
        png = self._make(source, uids, frame)
        from indexer.atomic import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        self.evict()
        return path

    def _make(self, source: DicomWebSource, uids: tuple[str, str, str], frame: int | None) -> bytes:
        import io

        from PIL import Image

        img: Image.Image
        try:
            data = source.rendered(*uids, frame=frame)
            with Image.open(io.BytesIO(data)) as opened:
                img = opened.copy()
        except InstanceUnavailable as exc:
            log.info("%s: the server cannot render it (%s); decoding it here", instance_ref(*uids), exc)
            img = Image.fromarray(decode_remote(source, uids, frame))
        img = img.convert("L") if img.mode not in ("L", "RGB") else img
        img.thumbnail((self.size, self.size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.png"))

    def evict(self) -> int:
        """Remove the least recently used thumbnails until the cache fits; returns how many went."""
        files = []
        for p in self.folder.glob("*.png"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, p in sorted(files, key=lambda t: t[0]):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


def decode_remote(
    source: DicomWebSource,
    uids: tuple[str, str, str],
    frame: int | None = None,
    ct_window: tuple[float, float] = (-100.0, 400.0),
) -> Any:
    """Fetch an instance and decode one frame with the project's DICOM reader (uint8 grayscale)."""
    import tempfile

    from retrieval.data.dicom import read_dicom_frames

    data = source.fetch(*uids, transfer_syntax=EXPLICIT_LE)  # decodable here whatever the server stores
    with tempfile.TemporaryDirectory(prefix="retrieve-dicomweb-") as tmp:
        path = Path(tmp) / f"{uids[2]}.dcm"
        path.write_bytes(data)
        frames = read_dicom_frames(path, ct_window, only=frame)
    return frames[0]
