"""The browser's logic without Streamlit: sessions, queries by upload and by indexed case, map cache."""

import json

import numpy as np
import pytest

from retrieval.errors import RetrieveError
from ui.backend import decode_upload, find_cases, open_session, query_frame, query_indexed, summary
from ui.map2d import MAP_FILE, load_or_compute_map


@pytest.fixture(scope="module")
def session(demo_index):
    return open_session(demo_index)


def query_upload(session, name, data, k, exclude_patients=(), where=(), frame=0):
    """What the page does with an upload: decode it once, then query with the chosen frame."""
    frames = decode_upload(name, data)
    return query_frame(
        session, name if len(frames) == 1 else f"{name}#{frame}", frames[frame], k, exclude_patients, where
    )


def test_upload_query(session, demo_data):
    data = (demo_data / "moderate" / "SYN200_f1.png").read_bytes()
    ans = query_upload(session, "scan.png", data, k=4)
    assert len(ans.result.hits) == 4 and ans.result.hits[0].score == pytest.approx(1, abs=1e-4)
    assert ans.result.vote.label is not None and ans.seconds > 0
    filtered = query_upload(session, "scan.png", data, k=3, exclude_patients=["SYN200"], where=[("label", "severe")])
    assert all(r["label"] == "severe" and r["patient_id"] != "SYN200" for r in filtered.result.to_dict()["results"])


def test_bad_uploads_are_one_line_errors(session):
    with pytest.raises(RetrieveError, match=r"notes.txt: unsupported file type '.txt'"):
        query_upload(session, "notes.txt", b"hello", k=3)
    with pytest.raises(RetrieveError, match="fake.png: not a readable image"):
        query_upload(session, "fake.png", b"hello", k=3)
    with pytest.raises(RetrieveError, match="over the 50 MB limit"):
        query_upload(session, "big.png", b"0" * (51 * 2**20), k=3)


def test_indexed_case_never_returns_itself_or_its_patient(session):
    rows = session.rows
    for position in (0, 7, 23):
        ans = query_indexed(session, position, k=8, exclude_own_patient=True)
        pid = rows.patient_id[position]
        assert len(ans.result.hits) == 8
        assert all(h.position != position and rows.patient_id[h.position] != pid for h in ans.result.hits)
    own = query_indexed(session, 0, k=3, exclude_own_patient=False)
    assert all(h.position != 0 for h in own.result.hits)
    assert rows.patient_id[own.result.hits[0].position] == rows.patient_id[0]  # same patient's frames look alike


def test_find_cases_and_summary(session):
    assert set(find_cases(session.rows, "syn30")["patient_id"]) == {"SYN300", "SYN301"}
    assert len(find_cases(session.rows, "nothing-like-this")) == 0
    s = summary(session)
    assert s["cases"] == 24 and s["patients"] == 8 and s["labels"]["severe"] == 6


@pytest.mark.slow
def test_map_is_cached_in_the_index_folder(demo_data, tmp_path):
    from retrieval.cli.main import main

    idx_dir = tmp_path / "idx"
    assert (
        main(
            [
                "index",
                "build",
                str(demo_data),
                "--index",
                str(idx_dir),
                "--encoder",
                "cnn5",
                "--image-size",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    s = open_session(idx_dir)
    first = load_or_compute_map(s.idx)
    assert (idx_dir / MAP_FILE).is_file() and len(first) == 24 and np.isfinite(first[["x", "y"]].to_numpy()).all()
    stamp = (idx_dir / MAP_FILE).stat().st_mtime_ns
    again = load_or_compute_map(s.idx)
    assert (idx_dir / MAP_FILE).stat().st_mtime_ns == stamp and again.equals(first)


def test_index_from_another_encoder_is_refused(demo_index, tmp_path):
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(demo_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["fingerprint"]["weights_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RetrieveError, match="weights differ"):
        open_session(copy)


def test_dicom_clip_upload_picks_a_frame(session, tmp_path):
    from conftest import write_dicom

    clip = np.random.default_rng(0).integers(0, 4000, (3, 64, 64)).astype(np.uint16)
    data = write_dicom(tmp_path / "clip.dcm", clip).read_bytes()
    assert len(decode_upload("clip.dcm", data)) == 3
    a = query_upload(session, "clip.dcm", data, k=3, frame=0)
    b = query_upload(session, "clip.dcm", data, k=3, frame=2)
    assert a.result.query == "clip.dcm#0" and b.result.query == "clip.dcm#2"


def test_retrieve_ui_refuses_a_missing_index(capsys, tmp_path):
    from conftest import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "ui", "--index", tmp_path / "nowhere")
    assert code == 2
    assert_one_line_error(err, "nowhere")
