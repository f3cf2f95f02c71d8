"""Index a PACS over DICOMweb, against a real Orthanc server on loopback (tests/dicomweb_fixture.py).

The expected instances of every search are computed from the generated archive's own description
(ARCHIVE), not from the server's answers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from dicomweb_fixture import ARCHIVE, OrthancServer, archive_datasets, orthanc_missing, to_bytes, write_archive

from indexer.index_dir import open_index_dir, verify_index_dir
from retrieval.config import EncoderSpec
from retrieval.data.dicomweb import (
    DEFAULT_VIEWER,
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    Credentials,
    DicomWebSource,
    Filters,
    ServerUnreachable,
    ThumbnailCache,
    instance_ref,
    load_credentials,
    parse_date,
    parse_ref,
    server_config,
    split_url,
)
from retrieval.errors import RetrieveError

pytest.importorskip("dicomweb_client")
MISSING = orthanc_missing()
needs_orthanc = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
USER, PASSWORD = "alice", "pw-Secr3t-9"


# --- what the archive holds, from its description ------------------------------------------------


def expected(since: str | None = None, modality: str | None = None, body_part: str | None = None) -> dict[str, int]:
    """SOP instance UID -> frames, for the archive instances a search should find."""
    out = {}
    for ds in archive_datasets():
        if since and ds.StudyDate < since:
            continue
        if modality and ds.Modality != modality:
            continue
        if body_part and ds.BodyPartExamined != body_part:
            continue
        out[str(ds.SOPInstanceUID)] = int(getattr(ds, "NumberOfFrames", 1))
    return out


def test_archive_description() -> None:
    """The fixture's archive: 3 patients, 4 studies, 6 series, 14 instances, one multi-frame cine."""
    dss = archive_datasets()
    assert len(dss) == sum(s.instances for s in ARCHIVE) == 14
    assert len({d.PatientID for d in dss}) == 3
    assert len({d.StudyInstanceUID for d in dss}) == 4
    assert len({d.SeriesInstanceUID for d in dss}) == 6
    assert sorted(int(getattr(d, "NumberOfFrames", 1)) for d in dss)[-1] == 6


# --- no server needed ----------------------------------------------------------------------------


def test_reference_round_trip() -> None:
    ref = instance_ref("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert ref == "dicomweb://1.2.3/1.2.3.4/1.2.3.4.5"
    assert parse_ref(ref) == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert parse_ref("/data/a.dcm") is None
    assert parse_ref("dicomweb://1.2/x/3") is None


def test_url_credentials_are_split_off_and_never_shown() -> None:
    clean, creds = split_url("https://bob:s3cr%40t@pacs.example.org:8443/dicom-web/")
    assert clean == "https://pacs.example.org:8443/dicom-web"
    assert creds is not None and creds.username == "bob" and creds.secret == "s3cr@t"
    assert "s3cr" not in repr(creds)
    cfg = server_config("https://bob:s3cr%40t@pacs.example.org/dicom-web", env={})
    assert "s3cr" not in repr(cfg) and cfg.verify is True
    with pytest.raises(RetrieveError, match="not an http") as err:
        split_url("ftp://bob:hush@pacs/dicom-web")
    assert "hush" not in str(err.value)


def test_credentials_from_env_and_file(tmp_path: Path) -> None:
    assert load_credentials(env={}) is None
    bearer = load_credentials(env={TOKEN_ENV: "tok-123"})
    assert bearer == Credentials("bearer", "tok-123")
    assert bearer.header() == {"Authorization": "Bearer tok-123"}
    basic = load_credentials(env={USER_ENV: "u", PASSWORD_ENV: "p"})
    assert basic is not None and basic.header() == {"Authorization": "Basic dTpw"}  # base64("u:p")
    with pytest.raises(RetrieveError, match=PASSWORD_ENV):
        load_credentials(env={USER_ENV: "u"})
    f = tmp_path / "auth.yaml"
    f.write_text("username: carol\npassword: very-secret\n")
    assert load_credentials(f, env={TOKEN_ENV: "ignored"}) == Credentials("basic", "very-secret", "carol")
    f.write_text("user: carol\npass: very-secret\n")
    with pytest.raises(RetrieveError) as err:
        load_credentials(f, env={})
    assert "very-secret" not in str(err.value) and str(f) in str(err.value)


def test_viewer_links_at_index_and_query_time() -> None:
    from retrieval.data.dicomweb import relink, viewer_link

    url = "https://pacs.example.org:8443/dicom-web"
    assert viewer_link(DEFAULT_VIEWER, url, "1.2", "1.2.3", "1.2.3.4") == (
        "https://pacs.example.org:8443/viewer?StudyInstanceUIDs=1.2"
    )
    hits = [{"source_url": url, "study_uid": "1.2", "series_uid": "1.2.3", "sop_uid": "1.2.3.4"}, {"path": "/a.png"}]
    relink(hits, "{base}/studies/{study}/series/{series}/instances/{instance}")
    assert hits[0]["viewer_url"] == f"{url}/studies/1.2/series/1.2.3/instances/1.2.3.4"
    assert "viewer_url" not in hits[1]
    with pytest.raises(RetrieveError, match="--viewer-url"):
        viewer_link("{nope}", url, "1", "2", "3")


def test_filters_and_dates() -> None:
    assert parse_date("2025-01-15") == "20250115" == parse_date("20250115")
    for bad in ("2025-13-01", "yesterday", "2025115"):
        with pytest.raises(RetrieveError, match="--since"):
            parse_date(bad)
    assert Filters(modality=" ct ", body_part="liver").modality == "CT"
    with pytest.raises(RetrieveError, match="--study"):
        Filters(studies=("1.2.x",))


# --- against Orthanc -----------------------------------------------------------------------------


def _server(root: Path, users: dict[str, str] | None = None) -> OrthancServer:
    server = OrthancServer(root, users).start()
    for ds in archive_datasets():
        server.upload(to_bytes(ds))
    return server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if MISSING:
        pytest.skip(MISSING)
    server = _server(tmp_path_factory.mktemp("orthanc"), {USER: PASSWORD})
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def encoder():
    from retrieval.pipeline import load_encoder

    return load_encoder(EncoderSpec("cnn5"), {"image_size": 64})


def _source(server: OrthancServer, **kw) -> DicomWebSource:
    env = {USER_ENV: USER, PASSWORD_ENV: PASSWORD} if server.users else {}
    return DicomWebSource(server_config(server.dicomweb, env=env, retries=kw.pop("retries", 1), backoff=0.05, **kw))


def _sync(*args, **kwargs):
    from retrieval.pacs import sync_dicomweb

    events = list(sync_dicomweb(*args, **kwargs))
    assert events[-1].stage == "done"
    return events[-1].result, events


@needs_orthanc
@pytest.mark.parametrize(
    "filters,want",
    [
        (Filters(), expected()),
        (Filters(since="2025-01-01"), expected(since="20250101")),
        (Filters(modality="CT"), expected(modality="CT")),
        (Filters(body_part="liver"), expected(body_part="LIVER")),
        (Filters(since="20250101", modality="CT"), expected(since="20250101", modality="CT")),
    ],
)
def test_search_filters(orthanc, filters, want) -> None:
    with _source(orthanc) as src:
        found = src.search(filters)
    assert sorted(r.sop_uid for r in found) == sorted(want)
    assert not any(r.patient_id is None or r.study_date is None for r in found)


@needs_orthanc
def test_search_by_study(orthanc) -> None:
    dss = archive_datasets()
    studies = sorted({str(d.StudyInstanceUID) for d in dss})[:2]
    want = sorted(str(d.SOPInstanceUID) for d in dss if d.StudyInstanceUID in studies)
    with _source(orthanc) as src:
        found = src.search(Filters(studies=tuple(studies) + (studies[0],)))  # a repeated --study counts once
        assert sorted({r.sop_uid for r in found}) == want


@needs_orthanc
@pytest.mark.slow
def test_build_then_incremental_sync_then_query(orthanc, encoder, tmp_path: Path, caplog) -> None:
    from retrieval.pacs import SyncOptions
    from retrieval.pipeline import embed_query_image, query_files

    caplog.set_level(logging.INFO)
    index = tmp_path / "idx"
    opts = SyncOptions(fetch_batch=4, use_gpu=False)
    first = expected(since="20250101")
    with _source(orthanc) as src:
        result, events = _sync(src, Filters(since="2025-01-01"), index, encoder, create=True, opts=opts)
        assert (result.found, result.already, result.fetched, result.indexed) == (len(first), 0, len(first), len(first))
        assert result.rows == sum(first.values())
        fetched = [e.fetched for e in events if e.stage == "fetched"]
        assert fetched == list(range(1, len(first) + 1))  # progress counts every instance
        assert events[-1].indexed == len(first)

        # the whole archive now: only what the index lacks is fetched
        everything = expected()
        result, _ = _sync(src, Filters(), index, encoder, opts=opts)
        assert (result.found, result.already, result.fetched) == (
            len(everything),
            len(first),
            len(everything) - len(first),
        )
        assert result.rows == sum(everything.values()) - sum(first.values())

        # and again: nothing new, nothing fetched, nothing written
        before = (index / "manifest.json").read_bytes()
        result, _ = _sync(src, Filters(since="20250101"), index, encoder, opts=opts)
        assert (result.fetched, result.indexed, result.manifest) == (0, 0, None)
        assert (index / "manifest.json").read_bytes() == before

    assert verify_index_dir(index) == []
    idx = open_index_dir(index, use_gpu=False)
    rows = idx.rows
    assert len(rows) == sum(everything.values()) == 19
    assert sorted(rows["sop_uid"].unique()) == sorted(everything)
    for col in ("study_uid", "series_uid", "sop_uid", "modality", "body_part", "study_date", "accession"):
        assert rows[col].notna().all(), col
    assert all(parse_ref(p) is not None for p in rows["path"])
    assert not any("Doe^" in str(v) for v in rows.drop(columns=["path"]).to_numpy().ravel())  # no PatientName
    assert set(rows["source_url"]) == {orthanc.dicomweb}
    row = rows.iloc[0]
    assert row["viewer_url"] == DEFAULT_VIEWER.format(origin=orthanc.base, study=row["study_uid"])

    # decoded by the same reader as a local file: the cine's frames give the very same vectors
    local = tmp_path / "local"
    paths = {p.stem: p for p in write_archive(local, archive_datasets())}
    cine = next(s for s, n in everything.items() if n == 6)
    names, vecs = embed_query_image(paths[cine], encoder)
    stored = idx.vectors
    mine = stored.rows["sop_uid"] == cine
    order = stored.rows.loc[mine, "frame_index"].to_numpy(dtype=int).argsort()
    np.testing.assert_allclose(stored.vectors[mine.to_numpy()][order], vecs, atol=1e-5)

    # a query with a local copy of an instance finds that instance, UIDs and link included
    single = next(s for s, n in everything.items() if n == 1)
    results, errors = query_files(idx, encoder, [str(paths[single])], k=3, include_self=True)
    assert errors == []
    top = results[0].to_dict()["results"][0]
    assert top["sop_uid"] == single and top["id"] == single and top["score"] > 0.999
    assert top["path"] == instance_ref(top["study_uid"], top["series_uid"], single)
    assert top["viewer_url"].endswith(f"StudyInstanceUIDs={top['study_uid']}")
    # honest queries: the very bytes of an indexed instance are left out of its own results by default
    results, _ = query_files(idx, encoder, [str(paths[single])], k=3)
    assert single not in [h["sop_uid"] for h in results[0].to_dict()["results"]]

    # a query by reference (a viewer asking for "cases like the one on screen"): fetched, embedded, left out
    from retrieval.pacs import embed_remote, positions_of_instance
    from retrieval.pipeline import query_vectors

    study, series = (rows.loc[rows["sop_uid"] == cine, c].iloc[0] for c in ("study_uid", "series_uid"))
    with _source(orthanc) as src:
        names, remote = embed_remote(src, study, series, cine, encoder)
    assert names == [f"{instance_ref(study, series, cine)}#{i}" for i in range(6)]
    np.testing.assert_allclose(remote, vecs, atol=1e-5)
    own = positions_of_instance(idx, cine)
    assert len(own) == 6
    answered = query_vectors(idx, names[:1], remote[:1], k=5, exclude_positions=own)
    assert cine not in [h["sop_uid"] for h in answered[0].to_dict()["results"]]
    assert PASSWORD not in caplog.text


@needs_orthanc
def test_credentials_refused_in_one_line(orthanc) -> None:
    with pytest.raises(ServerUnreachable) as err:
        DicomWebSource(server_config(orthanc.dicomweb, env={}, retries=0)).check()
    msg = str(err.value)
    assert "HTTP 401" in msg and USER_ENV in msg and "\n" not in msg
    in_url = orthanc.dicomweb.replace("http://", f"http://{USER}:{PASSWORD}@")
    cfg = server_config(in_url, env={}, retries=0)
    assert cfg.url == orthanc.dicomweb and PASSWORD not in repr(cfg)
    with DicomWebSource(cfg) as src:
        src.check()  # user:password@ in the URL becomes basic authentication
    bad = {USER_ENV: USER, PASSWORD_ENV: "wrong-Pa55"}
    with pytest.raises(ServerUnreachable, match="credentials were refused") as err:
        DicomWebSource(server_config(orthanc.dicomweb, env=bad, retries=0)).check()
    assert "wrong-Pa55" not in str(err.value)


@needs_orthanc
def test_not_dicomweb_and_server_down(orthanc) -> None:
    env = {USER_ENV: USER, PASSWORD_ENV: PASSWORD}
    with pytest.raises(RetrieveError, match="not a DICOMweb"):
        DicomWebSource(server_config(orthanc.base + "/no-such-root", env=env, retries=0)).check()
    from dicomweb_fixture import free_port

    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(ServerUnreachable, match="cannot reach the server") as err:
        DicomWebSource(server_config(url, env={}, retries=1, backoff=0.01)).check()
    assert "\n" not in str(err.value)


@needs_orthanc
@pytest.mark.slow
def test_server_stops_mid_sync(encoder, tmp_path: Path) -> None:
    """The index stays as it was before the sync, is valid, and the next sync completes it."""
    from retrieval.pacs import SyncOptions, sync_dicomweb

    server = _server(tmp_path / "orthanc")
    index = tmp_path / "idx"
    opts = SyncOptions(fetch_batch=2, use_gpu=False)
    try:
        with _source(server) as src:
            _sync(src, Filters(since="20250101"), index, encoder, create=True, opts=opts)
            before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file() and p.name != ".lock"}
            events = sync_dicomweb(src, Filters(), index, encoder, opts=opts)
            with pytest.raises(ServerUnreachable, match="the index is as it was before this sync"):
                for ev in events:
                    if ev.stage == "fetched" and ev.fetched == 3:  # mid-batch, after one batch was embedded
                        server.stop()
            after = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file() and p.name != ".lock"}
            assert after == before
            assert verify_index_dir(index) == []
        server.start()
        with _source(server) as src:
            result, _ = _sync(src, Filters(), index, encoder, opts=opts)
        assert result.fetched == len(expected()) - len(expected(since="20250101"))
        assert open_index_dir(index, use_gpu=False).count == sum(expected().values())

        # committing every 2 instances: what was committed stays, the next sync fetches only the rest
        index2 = tmp_path / "idx2"
        opts2 = SyncOptions(fetch_batch=2, commit_every=2, use_gpu=False)
        with _source(server) as src:
            with pytest.raises(ServerUnreachable, match="committed before it stopped"):
                for ev in sync_dicomweb(src, Filters(), index2, encoder, create=True, opts=opts2):
                    if ev.stage == "fetched" and ev.fetched == 5:
                        server.stop()
        assert verify_index_dir(index2) == []
        kept = open_index_dir(index2, use_gpu=False).rows["sop_uid"].nunique()
        assert kept in (4, 6)  # whole batches of 2 only (the 6th may have been fetched before the stop)
        server.start()
        with _source(server) as src:
            result, _ = _sync(src, Filters(), index2, encoder, opts=opts2)
        assert (result.already, result.fetched) == (kept, len(expected()) - kept)
        assert sorted(open_index_dir(index2, use_gpu=False).rows["sop_uid"].unique()) == sorted(expected())
    finally:
        server.stop(kill=True)


@needs_orthanc
@pytest.mark.slow
def test_undecodable_instance_is_skipped_and_counted(encoder, tmp_path: Path) -> None:
    from retrieval.pacs import SyncOptions

    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        good = archive_datasets()[:3]
        for ds in good:
            server.upload(to_bytes(ds))
        broken = archive_datasets()[3]
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7777.99"
        broken.Rows = broken.Columns = 512  # claims far more pixels than it holds
        server.upload(to_bytes(broken))
        index = tmp_path / "idx"
        with _source(server) as src:
            result, events = _sync(src, Filters(), index, encoder, create=True, opts=SyncOptions(use_gpu=False))
        assert (result.found, result.indexed, len(result.skipped)) == (4, 3, 1)
        assert events[-1].skipped == 1
        line = str(result.skipped[0])
        assert "\n" not in line and "1.2.826.0.1.3680043.9.7777.99" in line and "pixel data" in line
        assert open_index_dir(index, use_gpu=False).count == 3
    finally:
        server.stop(kill=True)


@needs_orthanc
def test_thumbnail_cache(orthanc, tmp_path: Path) -> None:
    from PIL import Image

    dss = archive_datasets()
    refs = [instance_ref(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in dss]
    cache = ThumbnailCache(tmp_path / "thumbs", max_bytes=10**9, size=32)
    with _source(orthanc) as src:
        first = cache.get(src, refs[0])
        with Image.open(first) as im:
            assert max(im.size) == 32
        assert cache.get(src, refs[0]) == first
        cine = next(i for i, d in enumerate(dss) if int(getattr(d, "NumberOfFrames", 1)) > 1)
        assert cache.get(src, refs[cine], frame=5).is_file()
        # the fallback where a server cannot render: fetched and decoded by the local reader, pixel for pixel
        from retrieval.data.dicom import read_dicom_frames
        from retrieval.data.dicomweb import decode_remote

        local = write_archive(tmp_path / "local", [dss[cine]])[0]
        uids = parse_ref(refs[cine])
        assert uids is not None
        np.testing.assert_array_equal(
            decode_remote(src, uids, frame=2), read_dicom_frames(local, (-100.0, 400.0), only=2)[0]
        )
        for ref in refs[:6]:
            cache.get(src, ref)
        total = cache.total_bytes()
        small = ThumbnailCache(tmp_path / "thumbs", max_bytes=total // 2, size=32)
        assert small.evict() > 0 and small.total_bytes() <= total // 2
        newest = small.get(src, refs[7])
        assert newest.is_file() and small.total_bytes() <= total // 2
    assert json.dumps(str(first))  # a path the UI can serve


@needs_orthanc
@pytest.mark.slow
def test_compressed_instance_the_reader_cannot_decode_is_fetched_uncompressed(encoder, tmp_path: Path) -> None:
    """Stored as JPEG-LS (lossless): without a local decoder the server is asked to transcode it once."""
    from retrieval.pacs import SyncOptions
    from retrieval.pipeline import embed_query_image

    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        ds = archive_datasets()[0]
        orthanc_id = server.upload(to_bytes(ds))["ID"]
        body = json.dumps({"Transcode": "1.2.840.10008.1.2.4.80", "Keep": ["SOPInstanceUID"], "Force": True})
        jpeg_ls = server._request(f"/instances/{orthanc_id}/modify", data=body.encode(), method="POST")
        server.delete_all()
        server.upload(jpeg_ls)
        with _source(server) as src:
            uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            assert b"1.2.840.10008.1.2.4.80" in src.fetch(*uids)[:1000]  # the server keeps it compressed
            result, _ = _sync(src, Filters(), tmp_path / "idx", encoder, create=True, opts=SyncOptions(use_gpu=False))
        assert (result.indexed, result.skipped) == (1, [])
        local = write_archive(tmp_path / "local", [ds])[0]
        _, want = embed_query_image(local, encoder)
        np.testing.assert_allclose(open_index_dir(tmp_path / "idx", use_gpu=False).vectors.vectors, want, atol=1e-5)
    finally:
        server.stop(kill=True)


# --- the command line ---------------------------------------------------------------------------


@needs_orthanc
@pytest.mark.slow
def test_cli_build_sync_query(orthanc, tmp_path: Path, capsys, monkeypatch) -> None:
    from conftest import FAST, run_cli

    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    index = tmp_path / "idx"
    url = orthanc.dicomweb
    code, out, err = run_cli(
        capsys, "index", "build", "--dicomweb", url, "--since", "2025-01-01", "--index", index, *FAST
    )
    assert code == 0, err
    first = len(expected(since="20250101"))
    assert f"fetched {first}, indexed {first}" in out
    code, out, err = run_cli(capsys, "index", "add", "--dicomweb", url, "--index", index, "--quiet")
    assert code == 0, err
    assert f"fetched {len(expected()) - first}," in out and f"index now holds {sum(expected().values())}" in out
    code, out, err = run_cli(capsys, "index", "add", "--dicomweb", url, "--since", "20250101", "--index", index, "-q")
    assert code == 0 and "fetched 0," in out and "index unchanged" in out
    local = write_archive(tmp_path / "local", archive_datasets())
    code, out, err = run_cli(capsys, "query", local[0], "--index", index, "--json", "--include-self", "--k", "3")
    assert code == 0, err
    answer = json.loads(out)
    top = (answer[0] if isinstance(answer, list) else answer)["results"][0]
    assert top["sop_uid"] == local[0].stem and top["study_uid"] and top["series_uid"]
    assert top["viewer_url"] == f"{orthanc.base}/viewer?StudyInstanceUIDs={top['study_uid']}"
    assert PASSWORD not in out + err


@needs_orthanc
@pytest.mark.slow
def test_cli_bad_url_and_server_down_exit_2(orthanc, tmp_path: Path, capsys, monkeypatch) -> None:
    from conftest import assert_one_line_error, run_cli
    from dicomweb_fixture import free_port

    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, "Wr0ng-pass")
    code, _, err = run_cli(capsys, "index", "build", "--dicomweb", "ftp://u:Wr0ng@host/x", "--index", tmp_path / "a")
    assert code == 2
    assert_one_line_error(err, "--dicomweb", "not an http")
    code, _, err = run_cli(capsys, "index", "build", "--dicomweb", orthanc.dicomweb, "--index", tmp_path / "b", "-q")
    assert code == 2
    assert_one_line_error(err, "credentials were refused")
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, _, err = run_cli(capsys, "index", "build", "--dicomweb", down, "--index", tmp_path / "c", "-q")
    assert code == 2
    assert_one_line_error(err, "cannot reach the server")
    code, _, err = run_cli(
        capsys, "index", "add", "--dicomweb", down, "--since", "2025-02-30", "--index", tmp_path / "c"
    )
    assert code == 2
    assert_one_line_error(err, "--since")
    assert "Wr0ng" not in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


class _FlakyProxy:
    """A real HTTP server in front of Orthanc that answers 503 to the first `failures` requests."""

    def __init__(self, target: str, failures: int):
        import http.server
        import threading
        import urllib.request

        outer = self
        self.failures, self.seen = failures, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                outer.seen += 1
                if outer.seen <= outer.failures:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(target + self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
                if self.headers.get("Authorization"):
                    req.add_header("Authorization", self.headers["Authorization"])
                with urllib.request.urlopen(req, timeout=30) as resp:
                    body = resp.read()
                    self.send_response(resp.status)
                    self.send_header("Content-Type", resp.headers.get("Content-Type", "application/octet-stream"))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@needs_orthanc
@pytest.mark.slow
def test_busy_answers_are_retried_with_backoff(orthanc) -> None:
    import time

    proxy = _FlakyProxy(orthanc.base, failures=2)
    env = {USER_ENV: USER, PASSWORD_ENV: PASSWORD}
    try:
        with DicomWebSource(server_config(proxy.url + "/dicom-web", env=env, retries=3, backoff=0.2)) as src:
            t = time.perf_counter()
            found = src.search(Filters(modality="CT"))
            waited = time.perf_counter() - t
        assert sorted(r.sop_uid for r in found) == sorted(expected(modality="CT"))
        assert proxy.seen > 2 and waited >= 0.2  # two 503s, then backoff before the retry that succeeds
        proxy.seen, proxy.failures = 0, 10
        with DicomWebSource(server_config(proxy.url + "/dicom-web", env=env, retries=2, backoff=0.01)) as src:
            with pytest.raises(ServerUnreachable, match="HTTP 503"):
                src.search(Filters())
        assert proxy.seen == 3  # the first try and two retries
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_server_that_never_answers_times_out() -> None:
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        t = time.perf_counter()
        with pytest.raises(ServerUnreachable, match="cannot reach the server"):
            DicomWebSource(server_config(url, env={}, timeout=0.3, retries=1, backoff=0.01)).check()
        assert time.perf_counter() - t < 5
