"""The Streamlit page under Streamlit's AppTest: controls, patient exclusion, honest queries, label colours,
upload limits, an index without labels, case view, bad index."""

import json
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
# a result card: rank, similarity, label (coloured with :color[...]{foreground=...}; absent without labels), patient
CARD = re.compile(
    r"\*\*#(\d+)\*\* · similarity \*\*([0-9.]+)\*\*  \n"
    r"(?:label (?::color\[)?\*\*(\S+?)\*\*(?:\]\{foreground='(#[0-9a-f]{6})'\})? · )?patient (\S+)"
)


def _app(monkeypatch, index) -> AppTest:
    monkeypatch.setenv("RETRIEVE_INDEX", str(index))
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def _cards(at):
    """(rank, similarity, label, patient) of each result card."""
    out = []
    for m in at.markdown:
        hit = CARD.match(m.value)
        if hit:
            rank, score, label, _, patient = hit.groups()
            out.append((rank, score, label, patient))
    return out


def _card_colours(at):
    return {g[2]: g[3] for g in (CARD.match(m.value).groups() for m in at.markdown if CARD.match(m.value))}


def _elements(at):
    def walk(node, out):
        for child in getattr(node, "children", {}).values():
            out.append(child)
            walk(child, out)
        return out

    return walk(at._tree, [])


def _chart_colour_scales(at):
    """The colour scale of every Vega-Lite chart (layers included) on the page."""
    scales = []
    for e in _elements(at):
        if getattr(e, "type", None) == "vega_lite_chart":
            spec = json.loads(e.proto.spec)
            for part in [spec, *spec.get("layer", [])]:
                scale = part.get("encoding", {}).get("color", {}).get("scale")
                if scale:
                    scales.append(scale)
    return scales


@pytest.mark.slow
def test_start_page_shows_summary_and_asks_for_a_query(monkeypatch, demo_index):
    at = _app(monkeypatch, demo_index)
    assert at.title[0].value == "Similar past cases"
    assert any("24 cases" in m.value for m in at.sidebar.markdown)
    assert at.info[0].value.startswith("Upload an image")


@pytest.mark.slow
def test_pick_case_with_patient_exclusion_k_filter_and_vote(monkeypatch, demo_index):
    at = _app(monkeypatch, demo_index)
    at.radio(key="mode").set_value("Pick an indexed case").run()
    at.text_input(key="case_search").set_value("SYN101").run()
    at.selectbox(key="case_choice").set_value("mild/SYN101_f2.png").run()
    cards = _cards(at)
    assert len(cards) == 10 and [int(c[0]) for c in cards] == list(range(1, 11))
    assert all(c[3] != "SYN101" for c in cards)  # own patient excluded by default
    scores = [float(c[1]) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert any(m.value.startswith("### Suggested label:") for m in at.markdown)
    assert any("not a diagnosis" in c.value for c in at.caption)
    at.slider(key="k").set_value(4).run()
    assert len(_cards(at)) == 4
    at.checkbox(key="exclude_own").uncheck().run()
    assert "SYN101" in [c[3] for c in _cards(at)]
    at.selectbox(key="filter_col").set_value("label").run()
    at.selectbox(key="filter_value").set_value("severe").run()
    assert {c[2] for c in _cards(at)} == {"severe"}
    at.radio(key="vote").set_value("similarity").run()
    assert any("Suggested label: **severe**" in m.value for m in at.markdown)


@pytest.mark.slow
def test_open_case_view_and_browse_on(monkeypatch, demo_index):
    from indexer.index_dir import open_index_dir

    ids = open_index_dir(demo_index, use_gpu=False).rows["id"].tolist()

    def opened_case(at):
        return next(h.value for h in at.subheader if h.value.startswith("Case "))

    at = _app(monkeypatch, demo_index)
    at.radio(key="mode").set_value("Pick an indexed case").run()
    button = next(b for b in at.button if b.label == "Open")
    position = int(button.key.rsplit("-", 1)[1])
    button.click().run()
    assert any(h.value == "Its own similar cases" for h in at.subheader)
    assert opened_case(at) == f"Case {ids[position]}"
    # browse on: open one of that case's own neighbours
    neighbour = next(b for b in at.button if b.label == "Open" and b.key.startswith(f"case{position}-"))
    next_position = int(neighbour.key.rsplit("-", 1)[1])
    assert next_position != position
    neighbour.click().run()
    assert opened_case(at) == f"Case {ids[next_position]}"
    at.button(key="use-as-query").click().run()
    assert at.selectbox(key="case_choice").value == ids[next_position]
    assert not any(h.value == "Its own similar cases" for h in at.subheader)


@pytest.mark.slow
def test_missing_and_foreign_index_are_messages(monkeypatch, tmp_path, demo_index):
    at = _app(monkeypatch, tmp_path / "no-index")
    assert "No index at" in at.error[0].value
    import json
    import shutil

    copy = tmp_path / "foreign"
    shutil.copytree(demo_index, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["fingerprint"]["weights_sha256"] = "f" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    at = _app(monkeypatch, copy)
    assert at.error and "Cannot open this index" in at.error[0].value and "weights differ" in at.error[0].value


@pytest.mark.slow
def test_labels_have_one_distinct_colour_in_every_chart(monkeypatch, demo_index):
    from retrieval.evaluation.report import LABEL_PALETTE

    at = _app(monkeypatch, demo_index)
    at.radio(key="mode").set_value("Pick an indexed case").run()
    expected = {"domain": ["mild", "moderate", "normal", "severe"], "range": list(LABEL_PALETTE[:4])}
    scales = _chart_colour_scales(at)
    assert len(scales) >= 3  # the vote bars, the map's points and its outlined neighbours
    assert all(scale == expected for scale in scales)
    colours = _card_colours(at)  # each card's label is written in its colour
    assert colours and all(colours[lab] == LABEL_PALETTE[expected["domain"].index(lab)] for lab in colours)


@pytest.mark.slow
def test_query_leaves_itself_out_unless_asked(monkeypatch, demo_index):
    at = _app(monkeypatch, demo_index)
    at.radio(key="mode").set_value("Pick an indexed case").run()
    at.text_input(key="case_search").set_value("SYN201_f1").run()
    at.selectbox(key="case_choice").set_value("moderate/SYN201_f1.png").run()
    at.checkbox(key="exclude_own").uncheck().run()
    assert not at.checkbox(key="include_self").value  # off by default
    ids = [c.value for c in at.caption if c.value.endswith(".png")]
    assert "moderate/SYN201_f1.png" not in ids and float(_cards(at)[0][1]) < 0.9999
    assert "SYN201" in [c[3] for c in _cards(at)]  # its own patient's other frames are allowed here
    at.checkbox(key="include_self").check().run()
    ids = [c.value for c in at.caption if c.value.endswith(".png")]
    assert ids[0] == "moderate/SYN201_f1.png" and float(_cards(at)[0][1]) == 1.0


@pytest.mark.slow
def test_upload_widget_states_the_limits_it_applies(monkeypatch, demo_index):
    from ui.backend import MAX_UPLOAD_MB

    at = _app(monkeypatch, demo_index)
    uploader = at.get("file_uploader")[0]
    assert uploader.proto.max_upload_size_mb == MAX_UPLOAD_MB  # what the widget refuses
    assert f"up to {MAX_UPLOAD_MB} MB, 64 megapixels per frame and 5,000 frames" in uploader.proto.label
    monkeypatch.setenv("RETRIEVE_MAX_PIXELS", "4000000")
    at = _app(monkeypatch, demo_index)
    assert "4 megapixels per frame" in at.get("file_uploader")[0].proto.label


@pytest.mark.slow
def test_index_without_labels_shows_no_vote(monkeypatch, demo_data, tmp_path):
    import shutil

    from retrieval.cli.main import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(demo_data.rglob("*.png"))[:9]:
        shutil.copy(p, flat / p.name)
    index = tmp_path / "idx"
    assert main(["index", "build", str(flat), "--index", str(index), "--encoder", "intensity-stats", "--quiet"]) == 0
    at = _app(monkeypatch, index)
    assert any(i.value.startswith("no labels") for i in at.sidebar.info)
    assert "label" not in at.selectbox(key="filter_col").options
    at.radio(key="mode").set_value("Pick an indexed case").run()
    assert not any(m.value.startswith("### Suggested label") for m in at.markdown)
    assert any(i.value.startswith("no labels") for i in at.main.info)
    cards = _cards(at)
    assert len(cards) == 8 and all(c[2] is None for c in cards)  # no label on the cards


@pytest.mark.slow
def test_data_root_that_does_not_hold_the_files_is_a_message(monkeypatch, tmp_path, demo_index):
    monkeypatch.setenv("RETRIEVE_DATA_ROOT", str(tmp_path))
    at = _app(monkeypatch, demo_index)
    assert at.error and "Cannot open this index" in at.error[0].value
    assert "does not hold the indexed files" in at.error[0].value


@pytest.mark.slow
def test_multilabel_index_shows_a_set_vote_and_filters_by_class(monkeypatch, multilabel_demo_index):
    at = _app(monkeypatch, multilabel_demo_index)
    at.radio(key="mode").set_value("Pick an indexed case").run()
    at.text_input(key="case_search").set_value("SYN300").run()
    at.selectbox(key="case_choice").set_value("severe/SYN300_f0.png").run()
    assert not at.exception, at.exception
    assert any(m.value.startswith("### Suggested classes:") and "**steatosis**" in m.value for m in at.markdown)
    assert not any(m.value.startswith("### Suggested label") for m in at.markdown)
    specs = [json.loads(e.proto.spec) for e in _elements(at) if getattr(e, "type", None) == "vega_lite_chart"]
    assert any(s.get("encoding", {}).get("x", {}).get("title") == "share of the votes" for s in specs)
    at.selectbox(key="filter_col").set_value("label").run()
    choice = at.selectbox(key="filter_value")
    assert choice.label == "label includes" and choice.options == ["mild", "moderate", "normal", "severe", "steatosis"]
    choice.set_value("steatosis").run()
    labels = [c[2] for c in _cards(at)]
    assert len(labels) == 10 and all("steatosis" in lab.split("|") for lab in labels)


@pytest.mark.slow
def test_person_names_of_an_old_index_never_reach_the_page(monkeypatch, demo_data, tmp_path):
    """An index built before names were dropped at ingest still holds PatientName and surname: the page offers
    neither as a filter and shows neither on the cards or in the case view."""
    import shutil

    import pandas as pd

    from retrieval.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    files = sorted(demo_data.rglob("*.png"))[:8]
    for p in files:
        shutil.copy(p, data / p.name)
    pd.DataFrame(
        {
            "path": [p.name for p in files],
            "label": ["a", "b"] * 4,
            "patient_id": [f"P{j}" for j in range(8)],
            "PatientName": [f"DOE^N{j}" for j in range(8)],
            "surname": ["DOE"] * 8,
        }
    ).to_csv(data / "labels.csv", index=False)
    index = tmp_path / "idx"
    with monkeypatch.context() as mp:
        mp.setattr("retrieval.data.dataset.person_name_columns", lambda columns: [])
        build = ["index", "build", str(data), "--index", str(index), "--encoder", "intensity-stats", "--quiet"]
        assert main(build) == 0
    at = _app(monkeypatch, index)
    assert at.selectbox(key="filter_col").options == ["(none)", "label"]
    at.radio(key="mode").set_value("Pick an indexed case").run()
    next(b for b in at.button if b.label == "Open").click().run()
    assert any(h.value == "Its own similar cases" for h in at.subheader)
    fields = at.dataframe[0].value
    assert "PatientName" not in set(fields["field"]) and "patient_id" in set(fields["field"])
    shown = [e.value for e in [*at.markdown, *at.caption, *at.subheader]] + [fields.to_string()]
    assert not any("DOE" in str(v) or "surname" in str(v) for v in shown)
