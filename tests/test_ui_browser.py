"""The browser as a user drives it: real Streamlit server, real headless Chromium via Playwright.

Skipped, with the reason, where Playwright or /usr/bin/chromium cannot start. Screenshots are
written to test-artifacts/ (or $RETRIEVE_TEST_ARTIFACTS).
"""

import os
import re
from pathlib import Path

import pytest

from ui.screenshot import CHROMIUM, launch_chromium, upload_and_wait

ARTIFACTS = Path(os.environ.get("RETRIEVE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
pytestmark = pytest.mark.slow  # a Streamlit server and a real Chromium per module: seconds per test

CARD = re.compile(r"#(\d+) · similarity ([0-9.]+)\s*label (\S+) · patient (\S+)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            b = launch_chromium(p)
        except Exception as exc:  # any launch failure means: no browser here
            pytest.skip(f"Chromium cannot start here: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(demo_index):
    from ui.launch import running_app

    with running_app(demo_index) as url:
        yield url


@pytest.fixture
def page(browser, app_url, request):
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Query by").wait_for(timeout=120_000)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    page.close()


def _cards(page):
    texts = page.locator("[data-testid=stMarkdownContainer]").all_inner_texts()
    return [CARD.search(" ".join(t.split())).groups() for t in texts if CARD.search(" ".join(t.split()))]


def test_upload_shows_k_cards_and_a_vote(page, demo_data):
    upload_and_wait(page, demo_data / "severe" / "SYN301_f1.png")
    page.wait_for_function("document.body.innerText.includes('#10 · similarity')", timeout=60_000)
    cards = _cards(page)
    assert [int(c[0]) for c in cards] == list(range(1, 11))
    assert all(0 < float(c[1]) <= 1.0001 and c[2] in {"normal", "mild", "moderate", "severe"} for c in cards)
    body = page.inner_text("body")
    assert re.search(r"Suggested label: \w+", body) and "of the votes" in body and "not a diagnosis" in body


FIRST_CARD = re.compile(r"#1 · similarity ([0-9.]+)\s+label (\S+) · patient (\S+)\s+(\S+)")


def _first_card(page):
    """(similarity, label, patient, case id) of the first result card."""
    page.wait_for_function("document.body.innerText.includes('#10 · similarity')", timeout=60_000)
    return FIRST_CARD.search(page.inner_text("[data-testid=stMain]")).groups()


def test_indexed_image_uploaded_is_not_its_own_first_result(page, demo_data):
    """Honest queries: an image already in the index, uploaded under another name, does not come back as
    its own first result (nor vote for its own label); the 'include the query itself' toggle brings it back."""
    query = demo_data / "moderate" / "SYN200_f1.png"
    renamed = ARTIFACTS / "query-copy.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    renamed.write_bytes(query.read_bytes())
    upload_and_wait(page, renamed)
    score, _, _, case = _first_card(page)
    assert case != "moderate/SYN200_f1.png" and float(score) < 0.9999
    assert "moderate/SYN200_f1.png" not in page.inner_text("[data-testid=stMain]")
    page.get_by_text("include the query itself and its near-duplicates").click()
    page.wait_for_function(
        "document.querySelector('[data-testid=stMain]').innerText.includes('moderate/SYN200_f1.png')",
        timeout=60_000,
    )
    score, label, patient, case = _first_card(page)
    assert (case, label, patient) == ("moderate/SYN200_f1.png", "moderate", "SYN200") and float(score) > 0.9999


OVERLAPS_JS = """() => {
  const main = document.querySelector('[data-testid=stMain]');
  // Streamlit's hover toolbars (fullscreen, chart menu) float over their element by design: not counted
  const sel = 'img, [data-testid=stMarkdownContainer], [data-testid=stVegaLiteChart], '
            + 'button:not([kind=elementToolbar]), [data-testid=stCaptionContainer], [data-testid=stFileUploader]';
  const els = [...main.querySelectorAll(sel)].filter(e => {
    const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  const name = e => e.tagName + ':' + (e.innerText || e.alt || '').trim().slice(0, 30);
  const out = [];
  for (const e of els) {
    const r = e.getBoundingClientRect();
    if (r.right > window.innerWidth + 1 || r.left < -1) out.push(['outside the window', name(e), r.left, r.right]);
  }
  for (let i = 0; i < els.length; i++) for (let j = i + 1; j < els.length; j++) {
    const a = els[i], b = els[j];
    if (a.contains(b) || b.contains(a)) continue;
    const r = a.getBoundingClientRect(), s = b.getBoundingClientRect();
    const w = Math.min(r.right, s.right) - Math.max(r.left, s.left);
    const h = Math.min(r.bottom, s.bottom) - Math.max(r.top, s.top);
    if (w > 2 && h > 2) out.push([name(a), name(b), w, h]);
  }
  return out;
}"""


def test_layout_at_1024_px_has_no_overlaps(browser, app_url, demo_data):
    """At 1024 px wide (sidebar open) no image, chart, text or button overlaps another, none leaves the window."""
    page = browser.new_page(viewport={"width": 1024, "height": 3000})
    try:
        page.goto(app_url, wait_until="domcontentloaded")
        page.get_by_text("Query by").wait_for(timeout=120_000)
        upload_and_wait(page, demo_data / "severe" / "SYN301_f1.png")
        page.wait_for_function("document.body.innerText.includes('#10 · similarity')", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('[data-testid=stSkeleton]').length == 0", timeout=60_000)
        page.wait_for_timeout(1500)  # charts and images settle
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "layout_1024.png"), full_page=True)
        assert page.locator("[data-testid=stSidebar]").is_visible()
        assert page.evaluate(OVERLAPS_JS) == []
    finally:
        page.close()


def test_pick_indexed_case_excludes_its_patient(page):
    page.get_by_text("Pick an indexed case").click()
    box = page.get_by_label("Find a case by id, path or patient")
    box.fill("SYN200_f2")
    box.press("Enter")
    page.get_by_text("moderate/SYN200_f2.png · label moderate · patient SYN200").wait_for(
        timeout=60_000
    )  # the query's caption
    page.wait_for_function("document.body.innerText.includes('#10 · similarity')", timeout=60_000)
    cards = _cards(page)
    assert len(cards) == 10
    assert all(c[3] != "SYN200" for c in cards)


def test_non_image_upload_is_an_error_message(page, tmp_path):
    bad = tmp_path / "report.txt"
    bad.write_text("this is not an image")
    page.locator("input[type=file]").set_input_files(str(bad))
    alert = page.get_by_text("unsupported file type '.txt'")
    alert.wait_for(timeout=60_000)
    assert "Traceback" not in page.inner_text("body")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not really a png")
    page.locator("input[type=file]").set_input_files(str(fake))
    page.get_by_text("fake.png: not a readable image").wait_for(timeout=60_000)
