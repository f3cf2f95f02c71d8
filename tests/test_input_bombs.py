"""Small files that would decode to huge ones are refused from what they say or by a bounded inflate: a deflated
DICOM (Deflated Explicit VR Little Endian), a DICOM holding more frames than its header says, a PNG past PIL's
own bomb limit. Every path (reader, header check, `retrieve index build`, `retrieve query`, `retrieve serve`)
gives the pixel-limit error: one line, exit 2 on the command line, 413 over HTTP.

The bombs are made small: the limit is lowered (RETRIEVE_MAX_PIXELS) so that 64 MiB of zeros, deflated to
about 64 KB, is over it; the memory used is measured with tracemalloc.
"""

from __future__ import annotations

import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, png_claiming, run_cli, write_dicom, write_png
from dicom_factory import make_deflated_dicom, set_frames_claim

from retrieval.cli.main import main
from retrieval.data.dicom import max_inflated_bytes, read_dicom_frames, read_dicom_header
from retrieval.data.imageio import is_dicom, read_frames
from retrieval.errors import RetrieveError, UnreadableImageError
from retrieval.server.uploads import UploadError, check_header

BOMB_BYTES = 64 << 20  # inflated size of the test bombs
LOW_PIXELS = "1000000"  # RETRIEVE_MAX_PIXELS for the tests: 8 MB may be inflated, the bombs are 64 MiB
CT = (-100.0, 400.0)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return make_deflated_dicom(tmp_path_factory.mktemp("bomb") / "bomb.dcm", pixel_bytes=BOMB_BYTES)


@pytest.fixture
def low_limit(monkeypatch):
    monkeypatch.setenv("RETRIEVE_MAX_PIXELS", LOW_PIXELS)
    assert max_inflated_bytes() == 8 * int(LOW_PIXELS)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_deflated_dicom_within_the_limit_is_read(tmp_path):
    frame = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    p = make_deflated_dicom(tmp_path / "ok.dcm", frame)
    assert p.stat().st_size < 1000
    header = read_dicom_header(p)
    assert header.n_frames == 1 and header.patient_id == "DEFL1"
    (out,) = read_dicom_frames(p, CT)
    assert np.array_equal(out, frame)  # 8-bit pixels without a window: as stored


def test_a_deflated_bomb_is_refused_by_the_reader_without_inflating_it(bomb, low_limit):
    assert bomb.stat().st_size < 200_000
    for read in (lambda: read_dicom_header(bomb), lambda: read_dicom_frames(bomb, CT), lambda: read_frames(bomb)):
        with pytest.raises(UnreadableImageError, match=r"over the limit of 8000000 \(8 x RETRIEVE_MAX_PIXELS\)"):
            read()
    peak = _peak(lambda: pytest.raises(UnreadableImageError, read_dicom_header, bomb))
    assert peak < 8_000_000  # inflated a piece at a time and dropped: never the 64 MiB, nor the 8 MB allowed


def test_a_deflated_bomb_without_preamble_or_suffix_is_still_refused(tmp_path, low_limit):
    p = make_deflated_dicom(tmp_path / "IM0001", pixel_bytes=BOMB_BYTES, preamble=False)
    assert is_dicom(p)  # found by its file meta, without pydicom inflating it
    with pytest.raises(UnreadableImageError, match="over the limit"):
        read_frames(p)


def test_a_deflated_bomb_upload_is_413_from_the_header_check(bomb, low_limit):
    with pytest.raises(UploadError) as caught:
        check_header(bomb, "dicom", "bomb.dcm")
    assert caught.value.status == 413
    assert str(caught.value).startswith("bomb.dcm: deflated data set") and "RETRIEVE_MAX_PIXELS" in str(caught.value)


def test_the_browser_refuses_a_deflated_bomb_upload(bomb, low_limit):
    backend = pytest.importorskip("ui.backend")
    with pytest.raises(RetrieveError, match=r"^bomb\.dcm: deflated data set .* over the limit"):
        backend.decode_upload("bomb.dcm", bomb.read_bytes())


@pytest.mark.slow
def test_a_deflated_bomb_past_the_default_limit_costs_little_memory(tmp_path):
    cap = max_inflated_bytes()  # 512 MB by default
    p = make_deflated_dicom(tmp_path / "big.dcm", pixel_bytes=cap + (1 << 20))
    assert p.stat().st_size < cap // 500
    with pytest.raises(UnreadableImageError, match="over the limit"):
        read_dicom_header(p)
    peak = _peak(lambda: pytest.raises(UnreadableImageError, read_dicom_header, p))
    assert peak < 20_000_000


def test_index_build_refuses_a_folder_of_only_a_deflated_bomb(bomb, low_limit, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bomb, data / "bomb.dcm")
    code, _, err = run_cli(capsys, "index", "build", data, "--index", tmp_path / "idx", "--encoder", "cnn5")
    assert code == 2
    assert_one_line_error(err, "bomb.dcm", "over the limit", "RETRIEVE_MAX_PIXELS")
    assert not (tmp_path / "idx").exists() or not any((tmp_path / "idx").iterdir())


@pytest.mark.slow
def test_index_build_skips_a_deflated_bomb_and_indexes_the_rest(bomb, low_limit, tmp_path, capsys):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for j in range(3):
        write_png(data / "a" / f"img{j}.png", rng.integers(0, 255, (48, 48), dtype=np.uint8))
    shutil.copy(bomb, data / "a" / "bomb.dcm")
    build = ["index", "build", data, "--index", tmp_path / "idx", "--encoder", "cnn5", "--image-size", "64"]
    code, out, err = run_cli(capsys, *build)
    assert code == 0, err
    assert "indexed 3 images" in out and "skipped 1" in out
    warnings = [ln for ln in err.splitlines() if "bomb.dcm" in ln]
    assert len(warnings) == 1 and "over the limit" in warnings[0]


# --- the HTTP server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """`retrieve serve`'s app over a three-image index (cnn5: no download), driven in-process."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app
    from retrieval.server.config import ServeConfig
    from retrieval.server.engine import load_engine

    root = tmp_path_factory.mktemp("serve_bombs")
    rng = np.random.default_rng(1)
    for j in range(3):
        write_png(root / "data" / "a" / f"img{j}.png", rng.integers(0, 255, (48, 48), dtype=np.uint8))
    build = ["index", "build", str(root / "data"), "--index", str(root / "index"), "--encoder", "cnn5"]
    assert main([*build, "--image-size", "64", "--quiet"]) == 0
    engine = load_engine(root / "index", root / "data", use_gpu=False)
    return TestClient(create_app(engine, ServeConfig(root / "index", data_root=root / "data")))


def _detail(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def test_the_server_answers_413_to_a_deflated_bomb(client, bomb, low_limit):
    r = client.post("/query", files={"file": ("bomb.dcm", bomb.read_bytes())}, data={"k": "1"})
    assert r.status_code == 413
    assert _detail(r).startswith("bomb.dcm: deflated data set") and "over the limit" in _detail(r)
    assert client.get("/health").status_code == 200


def test_a_png_past_pils_own_bomb_limit_is_413_with_the_pixel_limit(client, tmp_path, capsys):
    png = png_claiming(tmp_path / "bomb30k.png", 30000, 30000)  # 900 MP: PIL refuses it in Image.open
    message = "900000000 pixels, over the limit of 64000000 (RETRIEVE_MAX_PIXELS)"
    with pytest.raises(UploadError) as caught:
        check_header(png, "png", "bomb30k.png")
    assert caught.value.status == 413 and str(caught.value) == f"bomb30k.png: {message}"
    r = client.post("/query", files={"file": ("bomb30k.png", png.read_bytes())}, data={"k": "1"})
    assert r.status_code == 413 and _detail(r) == f"bomb30k.png: {message}"
    with pytest.raises(UnreadableImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_frames(png)


# --- more pixel data than the header says -----------------------------------------------------------------


def test_pixel_data_past_the_frames_the_header_claims_is_not_decoded(tmp_path, monkeypatch):
    """NumberOfFrames is what the file holds (PS3.5 8.1.1); data after those frames is ignored, so what is
    decoded never exceeds the claim that was checked against the frame limit."""
    monkeypatch.setenv("RETRIEVE_MAX_FRAMES", "5")
    clip = np.stack([np.full((16, 16), 100 * (i + 1), np.uint16) for i in range(12)])
    p = set_frames_claim(write_dicom(tmp_path / "liar.dcm", clip), b"2")
    assert read_dicom_header(p).n_frames == 2
    import retrieval.data.dicom as dicom_module

    decoded = []  # the shape pydicom decoded, before our own trim
    real = dicom_module._frames_from
    monkeypatch.setattr(dicom_module, "_frames_from", lambda ds, px, *a: decoded.append(px.shape) or real(ds, px, *a))
    frames = read_dicom_frames(p, CT)
    assert len(frames) == 2  # not 12, over the limit of 5
    assert decoded[0][0] == 2, decoded  # the excess frames were never decoded (pydicom 3: allow_excess_frames)
    assert np.array_equal(frames[0], read_dicom_frames(p, CT, only=0)[0])
    with pytest.raises(UnreadableImageError, match="frame 2 requested but the file has 2"):
        read_dicom_frames(p, CT, only=2)
    one = set_frames_claim(write_dicom(tmp_path / "one.dcm", clip), b"1")
    assert len(read_frames(one)) == 1


def test_pacs_transfer_syntax_reads_the_meta_group_only(tmp_path, monkeypatch):
    """The PACS path names a fetched file's transfer syntax without inflating a deflated data set."""

    from dicom_factory import make_deflated_dicom

    from retrieval.pacs import _transfer_syntax

    bomb = make_deflated_dicom(tmp_path / "bomb.dcm", pixel_bytes=64 << 20)
    inflated = []

    def spy(real):
        def call(*a, **kw):
            inflated.append(real.__name__)
            return real(*a, **kw)

        return call

    monkeypatch.setattr(zlib, "decompress", spy(zlib.decompress))  # what pydicom inflates a data set with
    monkeypatch.setattr(zlib, "decompressobj", spy(zlib.decompressobj))
    assert _transfer_syntax(bomb) == "1.2.840.10008.1.2.1.99" and not inflated


def test_meta_transfer_syntax_agrees_with_pydicom(tmp_path):
    """The meta-group reader that guards the inflation names the transfer syntax pydicom names, with and without
    the preamble, deflated or not, and stops where the data set starts; other bytes give None, never an error."""
    import pydicom
    from dicom_factory import make_dicom

    from retrieval.data.dicom import _meta_transfer_syntax

    frame = np.zeros((8, 8), np.uint8)
    files = [
        make_dicom(tmp_path / "a.dcm", frame[None]),
        make_dicom(tmp_path / "b.dcm", frame[None], preamble=False),
        make_deflated_dicom(tmp_path / "c.dcm", frame),
        make_deflated_dicom(tmp_path / "d.dcm", frame, preamble=False),
    ]
    for path in files:
        with open(path, "rb") as fh:
            got = _meta_transfer_syntax(fh)
            start = fh.tell()
        want = pydicom.dcmread(str(path), force=True, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
        assert got == (str(want) if want is not None else None), path
        assert struct.unpack("<H", path.read_bytes()[start : start + 2])[0] != 0x0002  # past the meta group
    for junk in (b"", b"\x89PNG\r\n\x1a\n" + bytes(200), bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI"):
        (tmp_path / "j.dcm").write_bytes(junk)
        with open(tmp_path / "j.dcm", "rb") as fh:
            assert _meta_transfer_syntax(fh) is None


def _odd_meta_bomb(path: Path, meta: bytes, preamble: bool = True) -> Path:
    """A deflated data set of 64 MiB of zeros (one private OB element) behind a hand-made file meta group."""
    body = struct.pack("<HH", 0x0011, 0x1010) + b"OB\0\0" + struct.pack("<I", BOMB_BYTES)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [deflate.compress(body)] + [deflate.compress(bytes(1 << 20)) for _ in range(BOMB_BYTES >> 20)]
    path.write_bytes((bytes(128) + b"DICM" if preamble else b"") + meta + b"".join(parts) + deflate.flush())
    return path


DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


@pytest.mark.parametrize(
    "layout",
    ["implicit VR meta", "implicit VR meta, no preamble", "undefined-length element first", "meta cut short"],
)
def test_an_odd_file_meta_group_does_not_let_a_bomb_through(tmp_path, low_limit, layout):
    """The guard fails closed (session 9 review): a meta group in implicit VR (pydicom accepts it) is followed,
    one with an element of undefined length or cut short is refused; pydicom never inflates the bomb."""
    implicit = struct.pack("<HHI", 2, 0x10, len(DEFLATED_UID)) + DEFLATED_UID
    meta = {
        "implicit VR meta": implicit,
        "implicit VR meta, no preamble": implicit,
        "undefined-length element first": struct.pack("<HH", 2, 0x99)
        + b"SQ\0\0"
        + struct.pack("<I", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        + implicit,
        "meta cut short": struct.pack("<HH", 2, 0x10) + b"UI" + struct.pack("<H", 200) + DEFLATED_UID,
    }[layout]
    path = _odd_meta_bomb(tmp_path / "odd.dcm", meta, preamble="no preamble" not in layout)
    if layout == "meta cut short":
        path.write_bytes(path.read_bytes()[: 132 + 8 + 30])  # the syntax's value runs past the end
    peak = _peak(lambda: pytest.raises(UnreadableImageError, read_dicom_header, path))
    assert peak < 20_000_000, peak
    with pytest.raises(UnreadableImageError, match=r"over the limit of 8000000|file meta group"):
        read_dicom_frames(path, CT)
