"""Query latency of the similar-case browser on an index (default: the demo index).

Measures (a) the backend alone: an uploaded image (decode + embed + search + vote) and an indexed
case (stored vector, search + vote); (b) in headless Chromium, the time from choosing a file in the
uploader to the 10th result card being on the page, after the first load. Medians over repeats.

    python benchmarks/bench_ui.py [--index retrieve-demo/index] [--repeats 7] [--out benchmarks/results/ui.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ui.backend import Session, decode_upload, open_session, query_frame, query_indexed  # noqa: E402
from ui.launch import running_app  # noqa: E402
from ui.screenshot import launch_chromium  # noqa: E402


def upload_seconds(session: Session, path: Path) -> float:
    """An uploaded file as the page handles it: decode, embed, search, vote."""
    data = path.read_bytes()
    t0 = time.perf_counter()
    frames = decode_upload(path.name, data)
    query_frame(session, path.name, frames[0], 10)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=Path("retrieve-demo/index"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ui.json")
    args = ap.parse_args()
    t = time.perf_counter()
    session = open_session(args.index)
    first_load = time.perf_counter() - t
    paths = session.rows["path"].tolist()
    picks = [paths[(j * 7) % len(paths)] for j in range(args.repeats)]
    upload_seconds(session, Path(picks[0]))  # warm-up
    upload = [upload_seconds(session, Path(p)) for p in picks]
    indexed = [query_indexed(session, (j * 5) % len(paths), 10).seconds for j in range(args.repeats)]

    from playwright.sync_api import sync_playwright

    browser_times = []
    with running_app(args.index) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        t = time.perf_counter()
        page.goto(url)
        page.get_by_text("Query by").wait_for(timeout=180_000)
        page_first_load = time.perf_counter() - t
        for j, path in enumerate([picks[0]] + picks):
            if j:  # a fresh page per upload; the server keeps its loaded encoder and index
                page.goto(url)
                page.get_by_text("Query by").wait_for(timeout=60_000)
            t = time.perf_counter()
            page.locator("input[type=file]").set_input_files(path)
            page.wait_for_function("document.body.innerText.includes('#10 · similarity')", timeout=120_000)
            if j:  # the first upload loads the encoder in the server process
                browser_times.append(time.perf_counter() - t)
        browser.close()
    rows = [
        ("backend, uploaded image (embed + search + vote)", statistics.median(upload)),
        ("backend, indexed case (search + vote)", statistics.median(indexed)),
        ("browser, upload -> 10 result cards on the page", statistics.median(browser_times)),
    ]
    print(
        f"index {args.index}: {len(paths)} cases; backend first load {first_load:.1f} s, "
        f"page first load {page_first_load:.1f} s"
    )
    print("| what | median s |\n|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "index": str(args.index),
                "cases": len(paths),
                "first_load_s": first_load,
                "page_first_load_s": page_first_load,
                "upload_s": upload,
                "indexed_s": indexed,
                "browser_upload_s": browser_times,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
