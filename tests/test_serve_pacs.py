"""`retrieve serve` over an index synced from a PACS, against a real Orthanc server on loopback
(tests/dicomweb_fixture.py): query by reference, thumbnails of rows that are not on local disk, and the
PACS's faults as one-line HTTP errors."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("dicomweb_client")
httpx = pytest.importorskip("httpx")

from conftest import write_png  # noqa: E402
from dicomweb_fixture import OrthancServer, archive_datasets, orthanc_missing, to_bytes  # noqa: E402

from retrieval.cli.main import main  # noqa: E402
from retrieval.config import EncoderSpec  # noqa: E402
from retrieval.data.dicomweb import PASSWORD_ENV, USER_ENV, DicomWebSource, Filters, server_config  # noqa: E402
from retrieval.server.app import create_app  # noqa: E402
from retrieval.server.config import PacsSettings, ServeConfig  # noqa: E402
from retrieval.server.engine import load_engine  # noqa: E402
from retrieval.server.run import running_server  # noqa: E402

MISSING = orthanc_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
USER, PASSWORD = "bob", "pw-Serve-7x"
CACHE_BYTES = 200_000


def _one_line(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert PASSWORD not in detail
    return detail


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc (with a password, given to the server through the sync's env variables) holding the archive
    but one instance (`late`, uploaded by a test after the build); an index synced from it; a served app."""
    from retrieval.pacs import SyncOptions, sync_dicomweb
    from retrieval.pipeline import load_encoder

    root = tmp_path_factory.mktemp("serve-pacs")
    dss = archive_datasets()
    late = dss[-1]  # a CT instance of P003
    saved = {k: os.environ.get(k) for k in (USER_ENV, PASSWORD_ENV)}
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = USER, PASSWORD
    server = OrthancServer(root / "orthanc", {USER: PASSWORD}).start()
    try:
        for ds in dss[:-1]:
            server.upload(to_bytes(ds))
        encoder = load_encoder(EncoderSpec("cnn5"), {"image_size": 64})
        with DicomWebSource(server_config(server.dicomweb, retries=1, backoff=0.05)) as src:
            events = list(
                sync_dicomweb(src, Filters(), root / "index", encoder, create=True, opts=SyncOptions(use_gpu=False))
            )
        assert events[-1].result.indexed == len(dss) - 1
        settings = PacsSettings(
            timeout=5, retries=0, thumbnail_cache=root / "thumbs", thumbnail_cache_bytes=CACHE_BYTES
        )
        engine = load_engine(root / "index", use_gpu=False, pacs=settings)
        with running_server(create_app(engine, ServeConfig(root / "index"))) as url:
            with httpx.Client(base_url=url, timeout=60) as client:
                yield server, client, dss, late, root
    finally:
        server.stop(kill=True)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _by_ref(client, ds, **kw):
    body = {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID), "instance": str(ds.SOPInstanceUID)}
    return client.post("/query-by-reference", json={**body, **kw})


def _by_file(client, ds, **kw):
    files = {"file": ("q.dcm", to_bytes(ds), "application/dicom")}
    return client.post("/query", files=files, data={k: str(v) for k, v in kw.items()})


def _same_answer(a: dict, b: dict) -> None:
    assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
    np.testing.assert_allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]], atol=1e-5)


def test_indexed_instance_by_reference_is_its_files_query_without_itself(pacs) -> None:
    _, client, dss, _, _ = pacs
    ds = dss[0]  # a single-frame US instance, indexed
    sop = str(ds.SOPInstanceUID)
    r = _by_ref(client, ds, k=5)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["query"] == f"dicomweb://{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{sop}"
    assert len(answer["results"]) == 5
    assert sop not in {h["sop_uid"] for h in answer["results"]}  # not its own first hit
    by_file = _by_file(client, ds, k=5)
    assert by_file.status_code == 200, by_file.text
    _same_answer(answer, by_file.json())
    # include_self: it comes back, first, with its own stored vector (cosine 1)
    kept = _by_ref(client, ds, k=5, include_self=True).json()["results"]
    assert kept[0]["sop_uid"] == sop and kept[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # filters pass through as in /query
    ct = _by_ref(client, ds, k=3, where=["modality=CT"]).json()
    indexed_ct = sum(d.Modality == "CT" for d in dss[:-1])  # the last one is held back
    assert {h["modality"] for h in ct["results"]} == {"CT"} and ct["matched"] == indexed_ct


def test_instance_added_after_the_build_is_fetched_from_the_pacs(pacs) -> None:
    server, client, _, late, _ = pacs
    server.upload(to_bytes(late))
    r = _by_ref(client, late, k=4)
    assert r.status_code == 200, r.text
    by_file = _by_file(client, late, k=4)
    assert by_file.status_code == 200, by_file.text
    _same_answer(r.json(), by_file.json())


def test_thumbnail_of_a_pacs_row_is_a_cached_png(pacs) -> None:
    _, client, dss, _, root = pacs
    sop = str(dss[0].SOPInstanceUID)
    r = client.get(f"/items/{sop}/thumbnail", params={"size": 32})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and max(img.size) <= 32
    cached = list((root / "thumbs").glob("*.png"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.content
    cine = next(ds for ds in dss if int(getattr(ds, "NumberOfFrames", 1)) > 1)
    frame = client.get(f"/items/{quote(str(cine.SOPInstanceUID) + '#2', safe='')}/thumbnail", params={"size": 48})
    assert frame.status_code == 200, frame.text
    assert max(Image.open(io.BytesIO(frame.content)).size) <= 48
    assert sum(p.stat().st_size for p in (root / "thumbs").glob("*.png")) <= CACHE_BYTES


def test_unknown_instance_is_404_in_one_line(pacs) -> None:
    _, client, dss, _, _ = pacs
    r = client.post(
        "/query-by-reference",
        json={"study": str(dss[0].StudyInstanceUID), "series": "1.2.3.4", "instance": "1.2.3.4.5", "k": 3},
    )
    assert r.status_code == 404
    assert "1.2.3.4.5" in _one_line(r)
    bad = client.post("/query-by-reference", json={"study": "x", "series": "1.2", "instance": "1.2.3"})
    assert bad.status_code == 422 and "study: not a DICOM UID" in _one_line(bad)


def test_openapi_lists_the_reference_query(pacs) -> None:
    schema = pacs[1].get("/openapi.json").json()
    body = schema["paths"]["/query-by-reference"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert {"study", "series", "instance"} <= set(fields["required"])


def test_pacs_stopped_is_502_and_the_server_keeps_answering(pacs, caplog) -> None:
    server, client, dss, _, _ = pacs
    caplog.set_level(logging.DEBUG)
    server.stop()
    try:
        unindexed = {"study": str(dss[0].StudyInstanceUID), "series": "1.2.3.4", "instance": "1.2.3.4.6"}
        r = client.post("/query-by-reference", json=unindexed)
        assert r.status_code == 502
        assert "cannot reach" in _one_line(r)
        thumb = client.get(f"/items/{dss[1].SOPInstanceUID}/thumbnail", params={"size": 40})  # not cached
        assert thumb.status_code == 502 and _one_line(thumb)
        assert client.get("/health").json()["status"] == "ok"
        # an indexed instance needs no PACS: its stored vector answers
        assert _by_ref(client, dss[0], k=3).status_code == 200
    finally:
        server.start()
    assert _by_ref(client, dss[2], k=3).status_code == 200
    assert PASSWORD not in caplog.text  # the PACS's credentials are never logged


def test_no_pacs_known_is_400(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    data = tmp_path / "data"
    for i in range(3):
        write_png(data / f"{i}.png", np.full((32, 32), 60 * i + 10, dtype=np.uint8))
    index = tmp_path / "index"
    assert (
        main(["index", "build", str(data), "--index", str(index), "--encoder", "cnn5", "--image-size", "64", "--quiet"])
        == 0
    )
    app = create_app(load_engine(index, use_gpu=False), ServeConfig(index))
    with TestClient(app) as client:
        r = client.post("/query-by-reference", json={"study": "1.2", "series": "1.2.3", "instance": "1.2.3.4", "k": 1})
    assert r.status_code == 400 and "PACS" in _one_line(r)
