"""Screenshot the app's Compare tab over a results store (regenerates docs/app-compare.png).

    python bench/app_screenshot.py [--store results/quantlab.db] [--out docs/app-compare.png]
    python bench/app_screenshot.py --tab Fit --store results/quantlab.db --out docs/app-fit.png

(``--tab Fit``: the Fit tab's fitted artifacts, bits per layer and predicted vs measured KLD; the
artifacts the store names must still be on disk.)

Copies the store into a temporary app workspace, starts the app there on a free local port,
opens the Compare tab in Debian's Chromium through Playwright and saves a full-page screenshot.
Needs `chromium` (apt) and the `playwright` Python package (the dev extra).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the app did not answer at {url} within {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="results/quantlab.db")
    p.add_argument("--out", default=str(ROOT / "docs" / "app-compare.png"))
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--tab", choices=["Compare", "Fit"], default="Compare")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    store = Path(args.store)
    if not store.is_file():
        raise SystemExit(f"no results store at {store}: run `make demo` first")
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "app-data"
        work.mkdir()
        # a consistent copy even while the store is in WAL mode
        with sqlite3.connect(store) as src, sqlite3.connect(work / "results.db") as dst:
            src.backup(dst)
        port = free_port()
        app = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workdir", str(work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(url)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": args.width, "height": 1000})
                page.goto(url)
                page.get_by_role("tab", name=args.tab).click()
                if args.tab == "Compare":
                    page.locator("#refresh").click()
                    shown = page.locator("#size-plot .scatterlayer .point").first
                else:
                    shown = page.locator("#bits-plot .scatterlayer .point").first
                expect(shown).to_be_visible(timeout=60_000)
                time.sleep(1.0)  # let the other plots finish drawing
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            app.terminate()
            app.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
