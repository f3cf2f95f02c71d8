"""The Streamlit page under Streamlit's AppTest: controls, patient exclusion, case view, bad index."""

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
CARD = re.compile(r"\*\*#(\d+)\*\* · similarity \*\*([0-9.]+)\*\*  \nlabel \*\*(\S+)\*\* · patient (\S+)")


def _app(monkeypatch, index) -> AppTest:
    monkeypatch.setenv("RETRIEVE_INDEX", str(index))
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def _cards(at):
    return [CARD.match(m.value).groups() for m in at.markdown if CARD.match(m.value)]


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
