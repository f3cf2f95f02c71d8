"""`retrieve serve`: the HTTP API driven over a real loopback socket (uvicorn + httpx): the same JSON as
`retrieve query --json`, bad uploads, tokens, path traversal, bounded requests; the server answers
/health after every bad request."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import assert_one_line_error, run_cli, write_dicom, write_png  # noqa: E402

from retrieval.cli.main import main  # noqa: E402
from retrieval.errors import RetrieveError  # noqa: E402
from retrieval.results import item_json  # noqa: E402
from retrieval.server.app import create_app  # noqa: E402
from retrieval.server.auth import bearer_ok, check_exposure, is_loopback, read_token  # noqa: E402
from retrieval.server.config import ServeConfig  # noqa: E402
from retrieval.server.engine import Engine, Forbidden, load_engine  # noqa: E402
from retrieval.server.guard import Guard  # noqa: E402
from retrieval.server.run import running_server  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD = 1 << 20  # 1 MB for these tests: above every test image, below what we send to be refused


def _noise(level: int, seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, 25, (size, size)), 0, 255).astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """data/{bright,dark}/*.png, a 3-frame DICOM clip, and a symlink out of data/ to outside/secret.png;
    indexed with the small cnn5 encoder (seeded random init: no download, fast)."""
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    for i in range(4):
        write_png(data / "bright" / f"b{i}.png", _noise(200, i))
        write_png(data / "dark" / f"d{i}.png", _noise(50, 10 + i))
    clip = np.stack([_noise(60, 20 + i).astype(np.uint16) * 200 for i in range(3)])
    write_dicom(data / "dark" / "clip.dcm", clip, patient_id="PCLIP")
    write_png(root / "outside" / "secret.png", _noise(120, 99))
    (data / "bright" / "link.png").symlink_to(root / "outside" / "secret.png")
    index = root / "index"
    build = ["index", "build", str(data), "--index", str(index), "--encoder", "cnn5", "--image-size", "64", "--quiet"]
    assert main(build) == 0
    return root


@pytest.fixture(scope="module")
def engine(served) -> Engine:
    return load_engine(served / "index", served / "data", use_gpu=False)


@pytest.fixture(scope="module")
def server(engine, served):
    """A real uvicorn server on a free loopback port, with a token; an httpx client that sends it."""
    cfg = ServeConfig(served / "index", token=TOKEN, data_root=served / "data", max_upload_bytes=MAX_UPLOAD)
    with running_server(create_app(engine, cfg)) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
            yield client


def _base(client) -> str:
    return str(client.base_url).rstrip("/")


def assert_alive(client) -> None:
    r = httpx.get(f"{_base(client)}/health", timeout=10)  # no token needed
    assert r.status_code == 200 and r.json()["status"] == "ok" and "stale" not in r.json()


def assert_clean_error(r, status: int, *needles: str) -> None:
    """A JSON error with one line naming the problem, never a traceback."""
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for n in needles:
        assert n in detail, (n, detail)


def _post(client, name: str, content: bytes, **fields):
    data = {k: v for k, v in fields.items() if v is not None}
    return client.post("/query", files={"file": (name, content, "application/octet-stream")}, data=data)


# --- queries ------------------------------------------------------------------------------------------


def test_query_answers_with_the_cli_json(server, served, capsys):
    img = served / "data" / "bright" / "b1.png"
    code, out, _ = run_cli(capsys, "query", img, "--index", served / "index", "--k", "5", "--json")
    assert code == 0
    cli = json.loads(out)
    r = _post(server, "b1.png", img.read_bytes(), k="5")
    assert r.status_code == 200, r.text
    api = r.json()
    assert api["query"] == "b1.png" and cli["query"] == str(img)
    assert {**api, "query": None} == {**cli, "query": None}
    assert [x["rank"] for x in api["results"]] == [1, 2, 3, 4, 5]
    assert "bright/b1.png" not in [x["id"] for x in api["results"]]  # an indexed image is not its own answer
    assert api["vote"]["label"] == "bright"
    assert_alive(server)


@pytest.mark.slow
def test_cases_and_a_moved_data_root_answer_as_the_cli(served, tmp_path, capsys):
    """--group-by and --data-root: the server passes them to the same call, so the JSON stays the CLI's."""
    import shutil

    from fastapi.testclient import TestClient

    moved = tmp_path / "moved"
    shutil.copytree(served / "data", moved)
    engine = load_engine(served / "index", moved, use_gpu=False)
    client = TestClient(create_app(engine, ServeConfig(served / "index", data_root=moved)))
    img = served / "data" / "dark" / "d3.png"
    args = ["query", img, "--index", served / "index", "--k", "4", "--json", "--data-root", moved]
    for extra, fields in (
        ([], {}),
        (["--group-by", "patient", "--agg", "mean"], {"group_by": "patient", "agg": "mean"}),
    ):
        code, out, _ = run_cli(capsys, *args, *extra)
        assert code == 0
        cli = json.loads(out)
        r = client.post("/query", files={"file": ("d3.png", img.read_bytes())}, data={"k": "4", **fields})
        assert r.status_code == 200, r.text
        assert {**r.json(), "query": None} == {**cli, "query": None}
        assert all(x["path"].startswith(str(moved.resolve())) for x in cli["results"])
    assert client.get("/items/bright/b0.png").json()["path"] == str(moved.resolve() / "bright" / "b0.png")
    (served / "data" / "bright" / "b0.png").rename(served / "data" / "bright" / "b0.moved")
    try:  # the thumbnail is read from the data root given, not from where the index was built
        assert client.get("/items/bright/b0.png/thumbnail").status_code == 200
    finally:
        (served / "data" / "bright" / "b0.moved").rename(served / "data" / "bright" / "b0.png")
    assert_clean_error(
        client.post("/query", files={"file": ("d3.png", img.read_bytes())}, data={"group_by": "ward"}), 422, "group_by"
    )


def test_include_self_keeps_the_indexed_image(server, served):
    img = served / "data" / "bright" / "b2.png"
    api = _post(server, "b2.png", img.read_bytes(), k="3", include_self="true").json()
    assert api["results"][0]["id"] == "bright/b2.png"
    assert api["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_multiframe_dicom_query_matches_the_cli(server, served, capsys):
    clip = served / "data" / "dark" / "clip.dcm"
    code, out, _ = run_cli(capsys, "query", clip, "--index", served / "index", "--k", "4", "--json")
    assert code == 0
    cli = json.loads(out)
    r = _post(server, "clip.dcm", clip.read_bytes(), k="4")
    assert r.status_code == 200, r.text
    api = r.json()
    assert isinstance(api, list) and len(api) == len(cli) == 3
    assert [a["query"] for a in api] == [f"clip.dcm#{i}" for i in range(3)]
    assert [{**a, "query": None} for a in api] == [{**c, "query": None} for c in cli]


def test_a_clip_over_the_frame_budget_is_refused_before_decoding(engine, served):
    """`--max-query-frames`: every frame of an uploaded clip is a query through the encoder, so a clip longer than
    the budget gets 413 from its header alone, and the server goes on answering."""
    cfg = ServeConfig(served / "index", token=TOKEN, data_root=served / "data", max_query_frames=2)
    clip = (served / "data" / "dark" / "clip.dcm").read_bytes()
    with running_server(create_app(engine, cfg)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        r = _post(client, "clip.dcm", clip, k="2")
        assert_clean_error(r, 413, "clip.dcm: 3 frames, over the limit of 2", "--max-query-frames")
        assert_alive(client)


def test_filters(server, served):
    img = (served / "data" / "dark" / "d0.png").read_bytes()
    api = _post(server, "d0.png", img, k="3", where="label=bright").json()
    assert api["matched"] >= 3 and {x["label"] for x in api["results"]} == {"bright"}
    r = server.post(
        "/query",
        files={"file": ("d0.png", img)},
        data={"k": "8", "exclude_patient": ["PCLIP"], "where": ["label=dark"]},
    )
    assert r.status_code == 200, r.text
    assert all(x["patient_id"] != "PCLIP" for x in r.json()["results"])
    assert_clean_error(_post(server, "d0.png", img, where="nosuch=1"), 400, "nosuch")
    assert_alive(server)


def test_messages_name_the_http_fields_not_the_cli_options(server, served):
    """The library's messages say --where, --exclude-patient ...; over HTTP they name the fields."""
    from retrieval.server.app import http_terms

    img = (served / "data" / "dark" / "d0.png").read_bytes()
    for fields, needle in (
        ({"where": "label="}, "where label="),
        ({"where": "nosuch=1"}, "where nosuch=1"),
        ({"exclude_patient": "NOBODY"}, "exclude_patient NOBODY"),
        ({"k": "500"}, "k 500: larger than"),
    ):
        r = _post(server, "d0.png", img, **fields)
        assert_clean_error(r, 400, needle)
        assert "--" not in r.json()["detail"], r.json()
    assert http_terms("--group-by ward: choose; --agg x; --vote y; --k 3; --index i") == (
        "group_by ward: choose; agg x; vote y; k 3; --index i"
    )


# --- the index changing under a running server ----------------------------------------------------------


@pytest.fixture
def copied(served, tmp_path) -> Path:
    """A copy of the served data, indexed on its own, for tests that change the index."""
    import shutil

    shutil.copytree(served / "data", tmp_path / "data", symlinks=True)
    build = ["index", "build", str(tmp_path / "data"), "--index", str(tmp_path / "index"), "--encoder", "cnn5"]
    assert main([*build, "--image-size", "64", "--quiet"]) == 0
    return tmp_path


@pytest.mark.slow
def test_a_running_server_follows_index_add_remove_and_compact(copied):
    """Another process adds, removes and compacts: the next request answers from the new version (a patient
    removed for privacy is no longer served: metadata, thumbnails, query hits, filters)."""
    from fastapi.testclient import TestClient

    data, index = copied / "data", copied / "index"
    engine = load_engine(index, data, use_gpu=False)
    client = TestClient(create_app(engine, ServeConfig(index, data_root=data)))
    start = client.get("/health").json()["generation"]
    count = engine.count
    clip = [f"dark/clip.dcm#{i}" for i in range(3)]
    assert all(client.get(f"/items/{c.replace('#', '%23')}").status_code == 200 for c in clip)
    img = (data / "dark" / "d0.png").read_bytes()

    write_png(data / "bright" / "b9.png", _noise(205, 77))
    assert main(["index", "add", str(data), "--index", str(index), "--no-gpu", "--quiet"]) == 0
    assert client.get("/health").json() == {"status": "ok", "generation": start + 1}
    assert client.get("/items/bright/b9.png").json()["label"] == "bright"
    assert client.get("/items/bright/b9.png/thumbnail").status_code == 200
    r = client.post("/query", files={"file": ("d0.png", img)}, data={"k": str(count + 1)})
    assert r.status_code == 200 and "bright/b9.png" in [x["id"] for x in r.json()["results"]]

    assert main(["index", "remove", "--index", str(index), "--patient", "PCLIP"]) == 0
    for c in clip:
        assert_clean_error(client.get(f"/items/{c.replace('#', '%23')}"), 404, "no item")
        assert_clean_error(client.get(f"/items/{c.replace('#', '%23')}/thumbnail"), 404, "no item")
    r = client.post("/query", files={"file": ("d0.png", img)}, data={"k": str(count + 1 - 3)})
    assert r.status_code == 200 and "PCLIP" not in r.text
    assert_clean_error(client.post("/query", files={"file": ("d0.png", img)}, data={"k": str(count)}), 400, "larger")
    r = client.post("/query", files={"file": ("d0.png", img)}, data={"k": "1", "where": "patient_id=PCLIP"})
    assert_clean_error(r, 400, "unknown patient_id 'PCLIP'")  # no longer among the values in the index

    before = {p.name for p in index.iterdir()}
    assert main(["index", "compact", "--index", str(index)]) == 0
    assert {p.name for p in index.iterdir()} != before  # the old shards and FAISS file are gone
    assert client.get("/health").json() == {"status": "ok", "generation": start + 3}
    assert client.get("/items/bright/b9.png").status_code == 200
    assert client.get("/items/dark/clip.dcm%230").status_code == 404
    r = client.post("/query", files={"file": ("d0.png", img)}, data={"k": str(count - 2), "include_self": "true"})
    assert r.status_code == 200 and len(r.json()["results"]) == count - 2 and "PCLIP" not in r.text
    if Path("/proc/self/maps").is_file():  # the old version's deleted files are let go (their disk space too)
        import gc

        gc.collect()
        held = [os.readlink(f) for f in Path("/proc/self/fd").iterdir() if f.exists()]
        held += Path("/proc/self/maps").read_text().splitlines()
        assert not [h for h in held if str(index) in h and "(deleted)" in h]
    for label in ("bright", "dark"):
        assert main(["index", "remove", "--index", str(index), "--where", f"label={label}"]) == 0
    r = client.post("/query", files={"file": ("d0.png", img)}, data={"k": "1"})
    assert_clean_error(r, 400, "the index is empty")


@pytest.mark.slow
def test_a_new_version_that_cannot_be_opened_keeps_the_old_one_served(copied, caplog):
    from fastapi.testclient import TestClient

    from indexer.index_dir import MANIFEST

    index = copied / "index"
    engine = load_engine(index, copied / "data", use_gpu=False)
    client = TestClient(create_app(engine, ServeConfig(index, data_root=copied / "data")))
    generation = client.get("/health").json()["generation"]
    manifest = index / MANIFEST
    good = manifest.read_text()
    broken = index / "broken.json"
    broken.write_text(good.replace('"shards": [', '"shards": [{"name": "shard-000009-abcdef.parquet"}, ', 1))
    broken.replace(manifest)  # a committed version naming a shard that is not there
    caplog.set_level(logging.INFO, logger="retrieval.server.engine")
    for _ in range(3):
        assert client.get("/items/bright/b0.png").status_code == 200
    assert client.get("/health").json() == {"status": "ok", "generation": generation, "stale": True}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "still serving generation" in errors[0].getMessage()
    broken.write_text(good)
    broken.replace(manifest)  # repaired: served again (the same version, so nothing is reopened)
    assert client.get("/health").json() == {"status": "ok", "generation": generation}


# --- bad input ----------------------------------------------------------------------------------------


def _dicom_bytes(tmp_path: Path, **changes) -> bytes:
    from pydicom import dcmread

    path = write_dicom(tmp_path / "x.dcm", _noise(90, 5).astype(np.uint16))
    ds = dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path.read_bytes()


@pytest.mark.slow
def test_bad_uploads_get_clear_4xx_and_the_server_keeps_serving(server, served, tmp_path, monkeypatch):
    png = (served / "data" / "dark" / "d1.png").read_bytes()
    cases = [
        (_post(server, "notes.png", b"just some text, not an image"), 415, "not a PNG, JPEG or DICOM"),
        (_post(server, "empty.png", b""), 415, "empty.png"),
        (_post(server, "cut.png", png[:60]), 422, "cut.png"),
        (_post(server, "fake.jpg", b"\xff\xd8\xff" + b"\0" * 500), 422, "fake.jpg"),
        (_post(server, "big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_UPLOAD + 1)), 413, "over the limit"),
        (_post(server, "nopixels.dcm", _dicom_bytes(tmp_path, PixelData=None)), 422, "pixel data"),
        (_post(server, "huge.dcm", _dicom_bytes(tmp_path, Rows=60000, Columns=60000)), 413, "over the limit"),
        (_post(server, "d1.png", png, k="0"), 422, "k"),
        (_post(server, "d1.png", png, k="1000"), 400, "larger than the"),
        (_post(server, "d1.png", png, k="ten"), 422, "k"),
        (_post(server, "d1.png", png, vote="loudest"), 422, "vote"),
        (_post(server, "d1.png", png, agg="median"), 422, "agg"),
        (server.post("/query", data={"k": "3"}), 422, "file"),
        (server.post("/query", content=b"x" * 100, headers={"content-type": "text/plain"}), 422, "file"),
    ]
    for r, status, needle in cases:
        assert_clean_error(r, status, needle)
        assert_alive(server)
    monkeypatch.setenv("RETRIEVE_MAX_PIXELS", "1000")  # 48 x 48 = 2304 pixels: read from the header, not decoded
    assert_clean_error(_post(server, "d1.png", png), 413, "d1.png", "RETRIEVE_MAX_PIXELS")
    assert_alive(server)


def test_body_over_the_limit_is_refused_while_streaming(server):
    """No Content-Length (chunked): the body is counted as it arrives and refused past the limit."""

    def chunks():
        for _ in range(40):
            yield b"\0" * 65536  # 2.5 MB in all

    r = server.post("/query", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert_clean_error(r, 413, "over the limit")
    assert_alive(server)


def test_bad_content_length_is_refused(server):
    url = urlsplit(str(server.base_url))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.putrequest("POST", "/query")
    conn.putheader("Authorization", AUTH["Authorization"])
    conn.putheader("Content-Length", str(50 * MAX_UPLOAD))
    conn.endheaders()  # declares 50 MB and sends none of it: refused by the header alone
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["detail"]
    conn.close()
    assert_alive(server)


# --- tokens -------------------------------------------------------------------------------------------


def test_every_endpoint_but_health_needs_the_token(server, caplog):
    caplog.set_level(logging.DEBUG)
    png = _png_bytes(_noise(100, 1))
    wrong = [
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcd"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
    ]
    paths = ["/items/bright/b0.png", "/items/bright/b0.png/thumbnail", "/openapi.json", "/docs", "/query"]
    with httpx.Client(base_url=_base(server), timeout=10) as anonymous:
        for headers in wrong:
            for path in paths:
                if path == "/query":
                    r = anonymous.post(path, headers=headers, files={"file": ("q.png", png)})
                else:
                    r = anonymous.get(path, headers=headers)
                assert r.status_code == 401, (headers, path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["detail"] == "missing or wrong access token"
        # refused before the body is read: a large upload without the token is 401, not 413
        assert anonymous.post("/query", content=b"\0" * (3 * MAX_UPLOAD)).status_code == 401
        assert anonymous.get("/health").status_code == 200
    assert server.get("/openapi.json").status_code == 200
    assert server.get("/items/bright/b0.png", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert TOKEN not in caplog.text


def test_token_rules(tmp_path, monkeypatch):
    assert bearer_ok(f"Bearer {TOKEN}".encode(), TOKEN)
    assert not bearer_ok(f"Bearer {TOKEN[:-1]}".encode(), TOKEN) and not bearer_ok(None, TOKEN)
    monkeypatch.setenv("RETRIEVE_TEST_TOKEN", f"  {TOKEN}\n")
    assert read_token("RETRIEVE_TEST_TOKEN", None) == TOKEN
    monkeypatch.setenv("RETRIEVE_TEST_TOKEN", "short")
    with pytest.raises(RetrieveError, match="at least 16"):
        read_token("RETRIEVE_TEST_TOKEN", None)
    with pytest.raises(RetrieveError, match="not set"):
        read_token("RETRIEVE_NO_SUCH_VARIABLE", None)
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert read_token(None, f) == TOKEN
    assert read_token(None, None) is None
    with pytest.raises(RetrieveError, match="cannot be read"):
        read_token(None, tmp_path / "missing")
    assert TOKEN not in repr(ServeConfig(Path("i"), token=TOKEN))


def test_listening_beyond_loopback_needs_a_token_or_insecure():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_exposure(host, None, False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(RetrieveError, match="access token"):
            check_exposure(host, None, False)
        check_exposure(host, TOKEN, False)
        check_exposure(host, None, True)
    with pytest.raises(RetrieveError, match="one or the other"):
        check_exposure("0.0.0.0", TOKEN, True)


def test_ui_beyond_loopback_needs_insecure_no_auth():
    from ui.launch import check_host

    check_host("127.0.0.1", False)
    check_host("0.0.0.0", True)
    with pytest.raises(RetrieveError, match="insecure-no-auth"):
        check_host("0.0.0.0", False)


# --- items and thumbnails -----------------------------------------------------------------------------


def test_item_metadata_and_thumbnail(server, served):
    r = server.get("/items/bright/b0.png")
    assert r.status_code == 200
    item = r.json()
    assert item["id"] == "bright/b0.png" and item["label"] == "bright" and "vector" not in item
    assert server.get("/items/bright%2Fb0.png").json() == item  # an encoded slash names the same item
    t = server.get("/items/bright/b0.png/thumbnail", params={"size": 32})
    assert t.status_code == 200 and t.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(t.content)) as im:
        assert max(im.size) == 32
    frame = server.get("/items/dark/clip.dcm#1/thumbnail".replace("#", "%23"))
    assert frame.status_code == 200 and frame.content.startswith(b"\x89PNG")
    assert_clean_error(server.get("/items/bright/b0.png/thumbnail", params={"size": 5000}), 422, "size")
    assert_clean_error(server.get("/items/no/such.png"), 404, "no item")


def test_openapi_declares_the_answers_it_gives(engine, served):
    """Every error status a route gives is declared with the body it really has; choices are enums."""
    from typing import get_args

    from fastapi.testclient import TestClient

    from retrieval.cases import AGGREGATIONS, CASE_COLUMNS
    from retrieval.server.app import Agg, GroupBy, Vote
    from retrieval.vote import VOTE_WEIGHTINGS

    assert (get_args(Vote), get_args(GroupBy), get_args(Agg)) == (VOTE_WEIGHTINGS, tuple(CASE_COLUMNS), AGGREGATIONS)
    client = TestClient(create_app(engine, ServeConfig(served / "index", data_root=served / "data")))
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(schema)  # FastAPI's list of errors, never sent
    declared = {
        ("/query", "post"): {"400", "401", "408", "413", "415", "422", "500", "503"},
        ("/query-by-reference", "post"): {"400", "401", "404", "408", "413", "422", "500", "502", "503"},
        ("/items/{item_id}/thumbnail", "get"): {"400", "401", "403", "404", "408", "413", "422", "500", "502"},
        ("/items/{item_id}", "get"): {"400", "401", "404", "408", "413", "500"},
    }
    for (path, method), statuses in declared.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) == statuses | {"200"}, path
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
    assert set(schema["paths"]["/items/{item_id}/thumbnail"]["get"]["responses"]["200"]["content"]) == {"image/png"}
    form = schema["components"]["schemas"]["Body_query_query_post"]["properties"]
    assert form["vote"]["enum"] == list(VOTE_WEIGHTINGS) and form["agg"]["enum"] == list(AGGREGATIONS)
    assert form["group_by"]["enum"] == list(CASE_COLUMNS) and "anyOf" not in form["group_by"]  # a form sends no null
    assert form["k"]["minimum"] == 1 and form["k"]["maximum"] == 1000
    png = _png_bytes(_noise(100, 1))
    for fields in ({"k": "0"}, {"k": "1001"}, {"vote": "loudest"}, {"group_by": "ward"}, {"agg": "median"}):
        r = client.post("/query", files={"file": ("q.png", png)}, data=fields)
        assert r.status_code == 422 and set(r.json()) == {"detail"} and isinstance(r.json()["detail"], str), fields
    r = client.post("/query", files={"file": ("q.png", png)}, data={"k": "1", "group_by": ""})  # empty: not grouped
    assert r.status_code == 200 and "results" in r.json()
    r = client.post("/query-by-reference", json={"study": "1.2", "series": "1.2.3", "instance": "x", "group_by": ""})
    assert_clean_error(r, 422, "instance: not a DICOM UID")


def test_one_file_per_request(server):
    png = _png_bytes(_noise(100, 1))
    for files in ([("file", ("a.png", png)), ("file", ("b.txt", b"hello"))], [("file", ("a.png", png))] * 2):
        assert_clean_error(server.post("/query", files=files), 400, "2 files in one request", "one image per request")
    for text in ({"data": {"file": "a.png"}}, {"files": [("file", ("", png))]}):  # a text field, an empty name
        assert_clean_error(server.post("/query", **text), 422, "file: a text field, not a file")
    assert_alive(server)


def test_unknown_parameters_are_refused_by_name(server):
    png = _png_bytes(_noise(100, 1))
    r = server.post("/query?k=5&where=label%3Ddark", files={"file": ("q.png", png)})
    assert_clean_error(r, 400, "unknown query parameters 'k', 'where'", "as form fields, not in the URL")
    r = server.post("/query", files={"file": ("q.png", png)}, data={"kk": "3", "k": "2"})
    assert_clean_error(r, 400, "unknown form field 'kk'", "the form fields are: agg, exclude_patient, file")
    assert_clean_error(server.get("/items/bright/b0.png?size=3"), 400, "unknown query parameter 'size'", "no query")
    r = server.get("/items/bright/b0.png/thumbnail", params={"size": 32, "sise": 3})
    assert_clean_error(r, 400, "unknown query parameter 'sise'", "the query parameters are: size")
    r = server.post("/query-by-reference", json={"study": "1.2", "series": "1.2.3", "instance": "1.2.3.4", "kk": 1})
    assert_clean_error(r, 400, "unknown field 'kk'", "study, series, instance")
    many = {f"x{i}": "1" for i in range(50)}
    assert_clean_error(server.post("/query", files={"file": ("q.png", png)}, data=many), 400, "and 45 more")
    assert server.post("/query", files={"file": ("q.png", png)}, data={"k": "2"}).status_code == 200
    assert_alive(server)


def test_odd_requests_get_messages_that_say_why(server):
    png = _png_bytes(_noise(100, 1))
    r = server.post("/query", files={"file": ("a" * 8000 + ".png", png)})
    assert_clean_error(r, 400, "Invalid multipart data: Maximum header size exceeded", "shorter file name")
    r = server.get("/items/" + "x" * 20000)
    assert_clean_error(r, 404, "no item 'xxx", "(20000 characters)")
    assert len(r.content) < 400
    r = server.post("/query-by-reference", content=b"{not json", headers={"content-type": "application/json"})
    assert_clean_error(r, 422, "the body is not valid JSON (Expecting property name")
    assert_alive(server)


def test_a_wrong_method_gets_405_with_allow(server):
    for method, path, allowed in (("PUT", "/query", "POST"), ("DELETE", "/items/bright/b0.png", "GET")):
        r = server.request(method, path)
        assert_clean_error(r, 405, "Method Not Allowed")
        assert r.headers["allow"] == allowed


def test_item_json_never_shows_person_names():
    row = {
        "id": "a",
        "path": "/d/a.png",
        "label": None,
        "patient_id": "P1",
        "PatientName": "DOE^JANE",
        "patient_name": "Jane Doe",
        "Patient's Name": "x",
        "study_uid": "1.2",
    }
    out = item_json(row)
    assert out == {"id": "a", "path": "/d/a.png", "label": None, "patient_id": "P1", "study_uid": "1.2"}


def _raw_get(client, path: str) -> tuple[int, bytes]:
    """A request line sent exactly as written (httpx would normalise ../ away)."""
    url = urlsplit(str(client.base_url))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", path, headers=AUTH)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


@pytest.mark.slow
def test_path_traversal_never_reads_outside_the_data_root(server, served):
    secret = (served / "outside" / "secret.png").read_bytes()
    secret_abs = str((served / "outside" / "secret.png").resolve())
    attempts = [
        "/items/../../../../etc/passwd",
        "/items/../../../../etc/passwd/thumbnail",
        "/items/..%2F..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/items/%2e%2e/%2e%2e/%2e%2e/etc/passwd/thumbnail",
        "/items/%252e%252e%252fetc%252fpasswd/thumbnail",
        "/items//etc/passwd/thumbnail",
        "/items/%2Fetc%2Fpasswd/thumbnail",
        "/items/bright/../../outside/secret.png/thumbnail",
        f"/items/{secret_abs}/thumbnail",  # the id the index gave the symlink: its target, outside data/
        f"/items/{secret_abs.replace('/', '%2F')}/thumbnail",
        "/items/bright/b0.png/../../../outside/secret.png/thumbnail",
    ]
    for path in attempts:
        status, body = _raw_get(server, path)
        assert status in (400, 403, 404), (path, status)
        assert b"root:" not in body and secret not in body and not body.startswith(b"\x89PNG"), path
        assert_alive(server)


def test_a_symlink_planted_after_indexing_is_refused(server, served):
    victim = served / "data" / "bright" / "b3.png"
    assert server.get("/items/bright/b3.png/thumbnail").status_code == 200
    victim.unlink()
    victim.symlink_to(served / "outside" / "secret.png")
    r = server.get("/items/bright/b3.png/thumbnail")
    assert_clean_error(r, 403, "outside the data root")
    assert_alive(server)


def test_locate_checks_the_resolved_path(engine, served):
    assert engine.locate(str(served / "data" / "bright" / "b0.png")).is_file()
    assert engine.locate("bright/b0.png").is_file()  # relative to the data root
    for bad in (
        "/etc/passwd",
        "../outside/secret.png",
        "bright/../../outside/secret.png",
        str(served / "data" / ".." / "outside" / "secret.png"),
    ):
        with pytest.raises((Forbidden, RetrieveError)):
            engine.locate(bad)


def test_a_folder_at_an_items_path_is_404_not_403(server, served):
    victim = served / "data" / "bright" / "b1.png"
    victim.rename(victim.with_suffix(".moved"))
    victim.mkdir()
    try:
        assert_clean_error(server.get("/items/bright/b1.png/thumbnail"), 404, "is a folder, not an image file")
    finally:
        victim.rmdir()
        victim.with_suffix(".moved").rename(victim)
    assert server.get("/items/bright/b1.png/thumbnail").status_code == 200


def test_a_data_root_without_the_files_is_an_error(served, tmp_path):
    with pytest.raises(RetrieveError, match="does not hold the indexed files"):
        load_engine(served / "index", tmp_path, use_gpu=False)
    with pytest.raises(RetrieveError, match="no such folder"):
        load_engine(served / "index", tmp_path / "nope", use_gpu=False)


# --- limits and CORS ----------------------------------------------------------------------------------


def test_concurrent_queries_are_bounded():
    """With every slot taken, the next query (by upload or by reference) gets 503 at once; other paths are not
    slotted."""

    async def scenario() -> tuple[int, int, int]:
        entered, release = asyncio.Event(), asyncio.Event()

        async def app(scope, receive, send):
            while (await receive()).get("more_body"):
                pass
            if scope["path"] == "/query":
                entered.set()
                await release.wait()  # a query by reference shares the slots: it runs the encoder too
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        transport = httpx.ASGITransport(app=Guard(app, token=None, max_body=1000, max_concurrent=1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.create_task(client.post("/query", content=b"a"))
            await entered.wait()
            second = await client.post("/query", content=b"b")
            by_reference = await client.post("/query-by-reference", content=b"{}")
            other = await client.get("/health")
            release.set()
            return (await first).status_code, second.status_code, by_reference.status_code, other.status_code

    assert asyncio.run(scenario()) == (200, 503, 503, 200)


def test_a_body_that_trickles_in_is_cut_off():
    async def scenario() -> httpx.Response:
        async def app(scope, receive, send):  # never reached
            raise AssertionError("the app ran")

        async def slow():
            yield b"a"
            await asyncio.sleep(2)
            yield b"b"

        transport = httpx.ASGITransport(app=Guard(app, token=None, max_body=1000, max_concurrent=1, body_timeout=0.2))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/query", content=slow())

    assert_clean_error(asyncio.run(scenario()), 408, "not received within")


def test_cors_is_off_unless_origins_are_named(engine, served):
    from fastapi.testclient import TestClient

    preflight = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST"}
    plain = TestClient(create_app(engine, ServeConfig(served / "index", data_root=served / "data")))
    assert "access-control-allow-origin" not in plain.options("/query", headers=preflight).headers
    assert "access-control-allow-origin" not in plain.get("/health", headers={"Origin": "https://x"}).headers
    cfg = ServeConfig(served / "index", token=TOKEN, cors_origins=("https://viewer.example",))
    named = TestClient(create_app(engine, cfg))
    r = named.options("/query", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://viewer.example"
    other = named.options("/query", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert named.get("/items/bright/b0.png", headers={"Origin": "https://viewer.example"}).status_code == 401


# --- the commands -------------------------------------------------------------------------------------


def test_serve_command_refuses_unsafe_settings_in_one_line(served, capsys, monkeypatch):
    index = served / "index"
    monkeypatch.setenv("RETRIEVE_TEST_TOKEN", TOKEN)
    bad = [
        (["--host", "0.0.0.0"], "access token"),
        (["--host", "0.0.0.0", "--token-env", "RETRIEVE_TEST_TOKEN", "--insecure-no-auth"], "one or the other"),
        (["--token-env", "RETRIEVE_NO_SUCH_VARIABLE"], "not set"),
        (["--cors-origin", "*"], "--cors-origin"),
        (["--data-root", str(served / "nope")], "no such folder"),
    ]
    for extra, needle in bad:
        code, _, err = run_cli(capsys, "serve", "--index", index, *extra)
        assert code == 2, (extra, err)
        assert_one_line_error(err, needle)


def test_serve_command_refuses_a_taken_port(served, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, _, err = run_cli(capsys, "serve", "--index", served / "index", "--port", s.getsockname()[1])
    assert code == 2
    assert_one_line_error(err, "cannot listen")


def test_ui_command_refuses_a_public_host_without_insecure(capsys, tmp_path):
    code, _, err = run_cli(capsys, "ui", "--host", "0.0.0.0", "--demo-out", tmp_path)
    assert code == 2
    assert_one_line_error(err, "insecure-no-auth")


@pytest.mark.slow
def test_retrieve_serve_runs_as_a_process(served, tmp_path):
    """The real command: starts, answers with the token, refuses without it, stops on SIGINT."""
    import signal
    import subprocess
    import sys
    import time

    from retrieval.server.run import free_port

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from retrieval.cli.main import main; main()",
        "serve",
        "--index",
        str(served / "index"),
        "--port",
        str(port),
        "--token-file",
        str(token_file),
        "--no-gpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # a loaded CI machine can take minutes to import torch and load the model
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "retrieve serve did not start"
            time.sleep(0.3)
        img = (served / "data" / "dark" / "d2.png").read_bytes()
        r = httpx.post(f"{url}/query", files={"file": ("d2.png", img)}, data={"k": "3"}, headers=AUTH, timeout=300)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert httpx.post(f"{url}/query", files={"file": ("d2.png", img)}, timeout=300).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    text = out.decode(errors="replace")
    assert "Traceback" not in text and TOKEN not in text
    assert "POST /query" in text  # the access log names requests, never their headers


def test_errors_never_show_where_the_index_and_data_lie(engine, served, monkeypatch):
    """A library message naming the server's index or data folder reaches the client with those folders named
    as words, not as the server's absolute paths."""
    from fastapi.testclient import TestClient

    from retrieval.errors import RetrieveError

    index, data = (served / "index").resolve(), engine.data_root

    def broken(*a, **kw):
        raise RetrieveError(f"--index {index}: shard {index}/shard-1.parquet unreadable; {data}/x.png missing")

    monkeypatch.setattr(engine, "query", broken)
    client = TestClient(create_app(engine, ServeConfig(served / "index", data_root=served / "data")))
    r = client.post("/query", files={"file": ("d0.png", (served / "data" / "dark" / "d0.png").read_bytes())})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert str(index) not in detail and str(data) not in detail and str(served) not in detail
    assert detail == "the index: shard the index/shard-1.parquet unreadable; the data root/x.png missing"
