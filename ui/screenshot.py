"""Screenshot of the browser on an index, for the README: upload one image, capture the page.

python -m ui.screenshot --index retrieve-demo/index \
    --image retrieve-demo/data/severe/SYN300_f0.png --out docs/images/ui.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ui.launch import running_app

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def upload_and_wait(page: Page, image: Path, timeout_ms: int = 60_000) -> None:
    page.locator("input[type=file]").set_input_files(str(image))
    page.get_by_text("Suggested label").first.wait_for(timeout=timeout_ms)
    page.get_by_text("similarity").last.wait_for(timeout=timeout_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/images/ui.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with running_app(args.index) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.goto(url, wait_until="networkidle")
        page.get_by_text("Query by").wait_for(timeout=90_000)
        upload_and_wait(page, args.image)
        page.wait_for_timeout(1500)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
