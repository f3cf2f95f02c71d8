"""Property-based fuzzing of the image, DICOM and manifest readers: a result or the tool's own clean error.

Any other exception (or a message over one line) is a failure. Bounded here; RETRIEVE_RELIABILITY=long
runs many more examples.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from budget import scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import write_dicom  # noqa: E402

from retrieval.data.dataset import load_dataset  # noqa: E402
from retrieval.data.dicom import read_dicom_header  # noqa: E402
from retrieval.data.imageio import read_frames  # noqa: E402
from retrieval.errors import RetrieveError  # noqa: E402

pytestmark = pytest.mark.reliability
FUZZ = settings(
    max_examples=scale(60, 3000),
    deadline=None,
    derandomize=not scale(0, 1),  # the bounded run is reproducible; the long run explores
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TALLY: dict[str, dict[str, int]] = {}


def _outcome(kind: str, fn) -> None:
    """Call fn; a value or a one-line RetrieveError pass, anything else fails the property."""
    tally = TALLY.setdefault(kind, {"inputs": 0, "read": 0, "refused": 0})
    tally["inputs"] += 1
    try:
        out = fn()
    except RetrieveError as exc:
        assert "\n" not in str(exc), str(exc)
        tally["refused"] += 1
        return
    tally["read"] += 1
    if isinstance(out, list):
        assert all(isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 2 for f in out)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(32 * 24, dtype=np.uint16).reshape(24, 32).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


SEEDS = {".png": _png_bytes(), ".jpg": _jpeg_bytes()}
mutations = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        b[pos % len(b)] = value
    return bytes(b[:cut] if cut is not None else b)


@FUZZ
@given(suffix=st.sampled_from(sorted(SEEDS)), edits=mutations, cut=st.none() | st.integers(0, 2000))
@pytest.mark.slow
def test_mutated_images(tmp_path_factory, suffix, edits, cut):
    p = tmp_path_factory.mktemp("img") / f"x{suffix}"
    p.write_bytes(_mutate(SEEDS[suffix], edits, cut))
    _outcome("image", lambda: read_frames(p))


@FUZZ
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif", ".dcm", ""]))
@pytest.mark.slow
def test_random_bytes_as_any_format(tmp_path_factory, data, suffix):
    p = tmp_path_factory.mktemp("raw") / f"x{suffix}"
    p.write_bytes(data if suffix else b"\0" * 128 + b"DICM" + data)
    _outcome("random bytes", lambda: read_frames(p))


@FUZZ
@given(edits=mutations, cut=st.none() | st.integers(0, 3000), frames=st.integers(1, 3))
@pytest.mark.slow
def test_mutated_dicom(tmp_path_factory, edits, cut, frames):
    folder = tmp_path_factory.mktemp("dcm")
    seed = write_dicom(folder / "seed.dcm", np.arange(frames * 64, dtype=np.uint16).reshape(frames, 8, 8))
    p = folder / "x.dcm"
    p.write_bytes(_mutate(seed.read_bytes(), edits, cut))
    _outcome("dicom header", lambda: read_dicom_header(p))
    _outcome("dicom pixels", lambda: read_frames(p))


cells = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**25), 10**25).map(str),
    st.floats().map(str),
    st.sampled_from(["", "a.png", "~nobody/a.png", "a\x00.png", "x" * 300, "../a.png", "/"]),
)


@FUZZ
@given(
    header=st.lists(
        st.sampled_from(["path", "label", "patient_id", "frame_index", "x", "id", "score", ""]), max_size=5
    ),
    rows=st.lists(st.lists(cells, min_size=0, max_size=6), max_size=6),
    raw=st.none() | st.binary(max_size=300),
)
@pytest.mark.slow
def test_manifests(tmp_path_factory, header, rows, raw):
    folder = tmp_path_factory.mktemp("manifest")
    Image.new("L", (8, 8)).save(folder / "a.png")
    m = folder / "m.csv"
    if raw is not None:
        m.write_bytes(raw)
    else:
        lines = [",".join(header)] + [",".join(json.dumps(c) if "," in c else c for c in r) for r in rows]
        m.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _outcome("manifest", lambda: load_dataset(m))


def test_zz_report_tally():
    """Printed with -s, for docs/reliability.md."""
    print(json.dumps({"fuzz": TALLY}))
