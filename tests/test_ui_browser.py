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
