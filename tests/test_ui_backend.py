"""The browser's logic without Streamlit: sessions, queries by upload and by indexed case, map cache."""

import json

import numpy as np
import pytest

from retrieval.errors import RetrieveError
from ui.backend import (
    MAX_UPLOAD_MB,
    decode_upload,
    find_cases,
    open_session,
    query_frame,
    query_indexed,
    summary,
    upload_digest,
    upload_limit_mb,
    upload_limit_text,
)
from ui.map2d import MAP_FILE, load_or_compute_map


@pytest.fixture(scope="module")
def session(demo_index):
    return open_session(demo_index)


def query_upload(session, name, data, k, exclude_patients=(), where=(), frame=0, include_self=False):
    """What the page does with an upload: decode it once, then query with the chosen frame."""
    frames = decode_upload(name, data)
    return query_frame(
        session,
        name if len(frames) == 1 else f"{name}#{frame}",
        frames[frame],
        k,
        exclude_patients,
        where,
        digest=upload_digest(data),
        include_self=include_self,
    )


def test_upload_query(session, demo_data):
    data = (demo_data / "moderate" / "SYN200_f1.png").read_bytes()
    ans = query_upload(session, "scan.png", data, k=4, include_self=True)
    assert len(ans.result.hits) == 4 and ans.result.hits[0].score == pytest.approx(1, abs=1e-4)
    assert ans.result.rows["id"].iloc[0] == "moderate/SYN200_f1.png"  # the very file, under another name
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
    with pytest.raises(RetrieveError, match="over the 2 MB limit"):
        decode_upload("big.png", b"0" * (3 * 2**20), max_mb=2)


def test_upload_of_an_indexed_image_does_not_find_itself(session, demo_data):
    """Honest queries: the uploaded file (same bytes, whatever its name) and its near-duplicates are left out
    of the results and the vote by default; include_self keeps them."""
    rows = session.rows
    data = (demo_data / "severe" / "SYN301_f1.png").read_bytes()
    digest = upload_digest(data)
    assert (rows["content_sha256"] == digest).sum() == 1
    own = set(rows.index[rows["content_sha256"] == digest])
    if "near_dup_group" in rows:
        groups = set(rows.loc[list(own), "near_dup_group"].dropna()) - {""}
        own |= set(rows.index[rows["near_dup_group"].isin(groups)])
    honest = query_upload(session, "query.png", data, k=len(rows) - len(own))
    assert len(honest.result.hits) == len(rows) - len(own)
    assert not own & {h.position for h in honest.result.hits}
    assert honest.result.hits[0].score < 0.9999
    kept = query_upload(session, "query.png", data, k=3, include_self=True)
    assert kept.result.hits[0].position in own and kept.result.hits[0].score == pytest.approx(1, abs=1e-4)


def test_upload_limits_agree_and_are_stated(monkeypatch):
    from retrieval.server.config import DEFAULT_MAX_UPLOAD_MB

    assert MAX_UPLOAD_MB == DEFAULT_MAX_UPLOAD_MB  # the browser and `retrieve serve` take the same files
    assert upload_limit_mb(None) == MAX_UPLOAD_MB and upload_limit_mb(200) == MAX_UPLOAD_MB
    assert upload_limit_mb(10) == 10  # a lower web-server limit is the real one
    assert (
        upload_limit_text(50) == "PNG, JPEG, BMP, TIFF or DICOM; up to 50 MB, 64 megapixels per frame and 5,000 frames"
    )
    monkeypatch.setenv("RETRIEVE_MAX_PIXELS", "1000")
    monkeypatch.setenv("RETRIEVE_MAX_FRAMES", "7")
    assert "0.001 megapixels per frame and 7 frames" in upload_limit_text(50)
    # the stated pixel limit is the one the reader applies
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("L", (40, 30)).save(buf, format="PNG")
    with pytest.raises(RetrieveError, match="40 x 30 pixels, over the limit of 1000"):
        decode_upload("wide.png", buf.getvalue())


def test_label_colours_are_distinct_and_fixed(session):
    from retrieval.evaluation.report import LABEL_PALETTE, UNLABELLED, UNLABELLED_COLOUR, label_colours

    for n in range(1, len(LABEL_PALETTE) + 1):
        labels = [f"class {j:02d}" for j in range(n)]
        colours = label_colours(labels)
        assert len(set(colours.values())) == n and UNLABELLED_COLOUR not in colours.values()
        assert label_colours(reversed(labels + labels)) == colours  # any order, repeats: the same mapping
        assert list(colours) == sorted(labels) and list(colours.values()) == list(LABEL_PALETTE[:n])
    assert label_colours(["benign", "malignant"]) == {"benign": LABEL_PALETTE[0], "malignant": LABEL_PALETTE[1]}
    assert label_colours(["b", UNLABELLED, "a"])[UNLABELLED] == UNLABELLED_COLOUR
    index_colours = session.label_colours()
    assert list(index_colours) == ["mild", "moderate", "normal", "severe"]
    assert len(set(index_colours.values())) == 4


def test_suffixless_dicom_upload_is_read(session, tmp_path):
    from conftest import write_dicom

    img = np.random.default_rng(1).integers(0, 4000, (64, 64)).astype(np.uint16)
    data = write_dicom(tmp_path / "IM0001", img).read_bytes()
    assert len(decode_upload("IM0001", data)) == 1
    with pytest.raises(RetrieveError, match="unsupported file type 'none'"):
        decode_upload("IM0002", b"\0" * 200)


@pytest.fixture(scope="module")
def unlabelled_index(demo_data, tmp_path_factory):
    """Nine of the demo images in one flat folder: no labels.csv, no class folders, so no labels."""
    import shutil

    from retrieval.cli.main import main

    flat = tmp_path_factory.mktemp("flat")
    for p in sorted(demo_data.rglob("*.png"))[:9]:
        shutil.copy(p, flat / p.name)
    index = tmp_path_factory.mktemp("flat_idx") / "idx"
    assert main(["index", "build", str(flat), "--index", str(index), "--encoder", "intensity-stats", "--quiet"]) == 0
    return index


def test_index_without_labels_has_no_vote(unlabelled_index):
    s = open_session(unlabelled_index)
    assert not s.labelled and summary(s)["labels"] == {} and summary(s)["unlabelled"] == 9
    ans = query_indexed(s, 0, k=3)
    assert ans.result.vote.label is None and ans.result.vote.note.startswith("no labels")
    assert len(ans.result.hits) == 3 and all(h.position != 0 for h in ans.result.hits)


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
    itself = query_indexed(session, 0, k=3, exclude_own_patient=False, include_self=True)
    assert itself.result.hits[0].position == 0 and itself.result.hits[0].score == pytest.approx(1, abs=1e-4)


def test_find_cases_and_summary(session):
    assert set(find_cases(session.rows, "syn30")["patient_id"]) == {"SYN300", "SYN301"}
    assert len(find_cases(session.rows, "nothing-like-this")) == 0
    s = summary(session)
    assert s["cases"] == 24 and s["patients"] == 8 and s["labels"]["severe"] == 6 and s["unlabelled"] == 0


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


def test_data_moved_without_the_index(demo_index, demo_data, tmp_path):
    """--data-root: the browser shows the files where they are now; a folder without them is an error."""
    import shutil

    from ui.backend import load_image

    moved = tmp_path / "moved"
    shutil.copytree(demo_data, moved)
    s = open_session(demo_index, data_root=moved)
    assert s.root == moved.resolve()
    assert all(str(p).startswith(str(moved.resolve())) for p in s.rows["path"])
    ans = query_indexed(s, 3, k=4)
    paths = ans.result.rows["path"].astype(str).tolist()
    assert len(paths) == 4 and all(p.startswith(str(moved.resolve())) for p in paths)
    assert load_image(paths[0], None, 64).shape[0] <= 64
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RetrieveError, match="does not hold the indexed files"):
        open_session(demo_index, data_root=empty)


def test_streamlit_is_told_our_upload_limit_and_the_data_root(tmp_path):
    """The web server refuses what the page would refuse (its default is 200 MB), and a moved data root
    given to `retrieve ui --data-root` reaches the page as its own `--data-root` argument."""
    from retrieval.data.limits import MAX_UPLOAD_MB
    from ui.launch import streamlit_command

    cmd = streamlit_command(tmp_path / "index", 8501, data_root=tmp_path / "moved")
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == str(MAX_UPLOAD_MB)
    page_args = cmd[cmd.index("--") + 1 :]
    assert page_args[page_args.index("--data-root") + 1] == str((tmp_path / "moved").resolve())
    assert "--data-root" not in streamlit_command(tmp_path / "index", 8501)


# --- multi-label labels (kidney|liver): the vote panel and the filter -------------------------------------


@pytest.fixture(scope="module")
def multilabel_session(multilabel_demo_index):
    """The demo images labelled as sets (every fatty grade also names `steatosis`), intensity-stats vectors."""
    return open_session(multilabel_demo_index)


def test_vote_panel_of_one_label_is_unchanged():
    from retrieval.vote import knn_vote
    from ui.backend import vote_view

    view = vote_view(knn_vote(["x", "y", "x"], [0.9, 0.8, 0.7]), 3)
    assert view.headline == "Suggested label: **x**" and view.detail == "67% of the votes of 3 similar cases"
    assert (
        not view.multilabel and view.axis == "votes" and dict(zip(view.bars.label, view.bars.votes)) == {"x": 2, "y": 1}
    )
    none = vote_view(knn_vote([None, None], [0.9, 0.8]), 2)
    assert none.headline is None and none.message == "no labelled neighbours" and none.bars.empty


def test_vote_panel_of_a_label_set_worked_by_hand():
    from retrieval.vote import multilabel_vote
    from ui.backend import vote_view

    # 4 neighbours a|b, a, b|c, a: a 3/4, b 2/4, c 1/4 -> {a, b}, each shown with its own share
    view = vote_view(multilabel_vote([{"a", "b"}, {"a"}, {"b", "c"}, {"a"}], [0.9, 0.8, 0.7, 0.6]), 4)
    assert view.headline == "Suggested classes: **a**, **b**"
    assert view.detail == (
        "a 75%, b 50% of the votes of 4 similar cases (a class is suggested when at least 50% of the votes name it)"
    )
    assert view.multilabel and view.axis == "share of the votes"
    assert dict(zip(view.bars.label, view.bars.votes)) == pytest.approx({"a": 0.75, "b": 0.5, "c": 0.25})
    # a, b, c once each: no class reaches half, and the panel says so with every share
    empty = vote_view(multilabel_vote([{"a"}, {"b"}, {"c"}], [0.9, 0.8, 0.7]), 3)
    assert empty.headline is None and len(empty.bars) == 3
    assert (
        empty.message
        == "No class has at least 50% of the votes of 3 similar cases (a 33%, b 33%, c 33%), so no suggestion."
    )
    nobody = vote_view(multilabel_vote([None], [0.9]), 1)
    assert nobody.headline is None and nobody.message == "no labelled neighbours" and nobody.bars.empty


def test_set_vote_and_class_filter_in_the_browser(multilabel_session, session):
    from indexer.search import set_members
    from ui.backend import filter_choices, vote_view

    s = multilabel_session
    assert filter_choices(s.rows, "label") == ("label includes", ["mild", "moderate", "normal", "severe", "steatosis"])
    assert filter_choices(session.rows, "label") == ("label =", ["mild", "moderate", "normal", "severe"])
    seen = set()
    for position in range(len(s.rows)):
        ans = query_indexed(s, position, k=4)
        view = vote_view(ans.result.vote, len(ans.result.hits))
        sets = [set_members(lab) for lab in ans.result.rows["label"]]  # recomputed from the neighbours shown
        shares = {c: sum(c in x for x in sets) / len(sets) for c in set().union(*sets)}
        chosen = sorted(c for c, share in shares.items() if share >= 0.5)
        assert dict(zip(view.bars.label, view.bars.votes)) == pytest.approx(shares)
        if chosen:
            assert view.headline == "Suggested classes: " + ", ".join(f"**{c}**" for c in chosen)
            assert view.detail.startswith(", ".join(f"{c} {shares[c]:.0%}" for c in chosen) + " of the votes of 4 ")
        else:
            assert view.headline is None and view.message.startswith("No class has at least 50% of the votes of 4")
        seen.add(len(chosen))
    assert seen >= {1, 2}  # a normal neighbourhood votes {normal}, a fatty one {grade, steatosis} or {steatosis}
    # the filter the sidebar offers: `label includes steatosis` keeps every fatty image, whatever its grade
    ans = query_indexed(s, 0, k=6, where=[("label", "steatosis")])
    assert ans.result.matched == 18 and all("steatosis" in set_members(lab) for lab in ans.result.rows["label"])


# --- person names and odd inputs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_session(tmp_path_factory, demo_data):
    """An index built before person-name columns were dropped at ingest: its rows hold PatientName and
    surname (the ingest drop is switched off while it is built). Its data folder also has a link to a file
    outside it."""
    import shutil

    import pandas as pd
    from conftest import write_png

    from retrieval.cli.main import main

    root = tmp_path_factory.mktemp("named_ui")
    data = root / "data"
    data.mkdir()
    files = sorted(demo_data.rglob("*.png"))[:6]
    for p in files:
        shutil.copy(p, data / p.name)
    secret = write_png(root / "outside" / "secret.png", np.full((32, 32), 99, np.uint8))
    (data / "link.png").symlink_to(secret)
    paths = [p.name for p in files] + ["link.png"]
    pd.DataFrame(
        {
            "path": paths,
            "label": ["a", "b"] * 3 + ["a"],
            "patient_id": [f"P{j}" for j in range(7)],
            "PatientName": [f"DOE^N{j}" for j in range(7)],
            "surname": ["DOE"] * 7,
            "site": ["x", "y"] * 3 + ["x"],
        }
    ).to_csv(data / "labels.csv", index=False)
    index = root / "idx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("retrieval.data.dataset.person_name_columns", lambda columns: [])
        build = ["index", "build", str(data), "--index", str(index), "--encoder", "intensity-stats", "--quiet"]
        assert main(build) == 0
    return open_session(index)


def test_the_browser_never_offers_or_shows_person_names(named_session):
    from ui.backend import case_fields, filter_choices

    s = named_session
    assert "PatientName" in s.idx.columns  # the old index holds names ...
    assert s.metadata_columns() == ["site"]  # ... the browser offers none of them
    assert "PatientName" not in s.rows and "surname" not in s.rows
    with pytest.raises(RetrieveError, match="^PatientName holds person names") as err:
        filter_choices(s.idx.rows, "PatientName")
    assert "DOE" not in str(err.value)
    assert filter_choices(s.rows, "site") == ("site =", ["x", "y"])
    row = s.idx.rows.iloc[0].to_dict()
    assert not any("DOE" in str(v) or f in ("PatientName", "surname") for f, v in case_fields(row))
    ans = query_indexed(s, 0, k=3)
    assert "PatientName" not in ans.result.rows and "DOE" not in json.dumps(ans.result.to_dict(), default=str)
    with pytest.raises(RetrieveError, match="person names") as err:
        query_indexed(s, 0, k=3, where=[("PatientName", "DOE^N1")])
    assert "DOE" not in str(err.value)


def test_a_linked_file_outside_the_data_root_is_refused(named_session):
    from ui.backend import load_image

    s = named_session
    link = s.rows.set_index("id").loc["link.png", "path"]  # stored as placed, not as its target
    assert "outside" not in link and "secret" not in link
    assert load_image(link, None, 16).shape == (16, 16)  # without a root, as before
    with pytest.raises(RetrieveError, match="link.png: the file lies outside the data root"):
        load_image(link, None, 16, root=s.root)
    inside = s.rows.set_index("id").loc[s.rows["id"].iloc[0], "path"]
    assert load_image(inside, None, 16, root=s.root).ndim == 2


def test_odd_inputs_are_one_line_errors(named_session, tmp_path):
    from ui.backend import load_image

    s = named_session
    frame = np.full((32, 32), 50, np.uint8)
    for position in (99, 7, -1, 1.5, True):
        with pytest.raises(RetrieveError, match=r"no indexed case at position .*: the index holds 7"):
            query_indexed(s, position, k=3)
    with pytest.raises(RetrieveError, match=r"q: a query frame is one non-empty grayscale image"):
        query_frame(s, "q", np.zeros((0, 0), np.uint8), 2)
    with pytest.raises(RetrieveError, match=r"q: a query frame is one non-empty grayscale image"):
        query_frame(s, "q", np.zeros((8, 8, 3), np.uint8), 2)
    with pytest.raises(RetrieveError, match=r"max_side -5: must be at least 1"):
        load_image(s.rows["path"].iloc[0], None, -5)
    assert len(query_frame(s, "q", frame, 3).result.hits) == 3


def test_an_empty_index_says_so(named_session, tmp_path):
    import shutil

    from retrieval.cli.main import main

    index = tmp_path / "idx"
    shutil.copytree(named_session.idx.path, index)
    ids = named_session.idx.rows["id"].tolist()
    assert main(["index", "remove", "--index", str(index), *[a for i in ids for a in ("--id", i)]]) == 0
    empty = open_session(index)
    frame = np.full((32, 32), 50, np.uint8)
    empty_index = r"^the index is empty \(every row was removed, or none was added\): add images first$"
    with pytest.raises(RetrieveError, match=empty_index):
        query_frame(empty, "q", frame, 5)
    with pytest.raises(RetrieveError, match="no indexed case at position 0: the index holds 0"):
        query_indexed(empty, 0, k=5)


def test_uploads_are_typed_by_their_bytes(tmp_path):
    from conftest import write_dicom
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(np.full((20, 30), 80, np.uint8)).save(png)
    dcm = write_dicom(tmp_path / "b.dcm", np.full((24, 16), 900, np.uint16)).read_bytes()
    assert decode_upload("x.dcm", png.read_bytes())[0].shape == (20, 30)  # PNG bytes named .dcm
    assert decode_upload("x.png", dcm)[0].shape == (24, 16)  # DICOM bytes named .png
    assert decode_upload("", png.read_bytes())[0].shape == (20, 30)  # no name at all
    bmp = tmp_path / "c.bmp"
    Image.fromarray(np.full((5, 7), 1, np.uint8)).save(bmp)
    assert decode_upload("c.jpg", bmp.read_bytes())[0].shape == (5, 7)
    with pytest.raises(RetrieveError, match=r"^upload: unsupported file type 'none'"):
        decode_upload("", b"hello")
