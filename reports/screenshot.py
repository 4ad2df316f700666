"""Headless-Chromium PNG of an HTML report: `python -m geodiag.reports.screenshot REPORT.html OUT.png`.

Why: a picture of the rendered page is what a reviewer checks (and what CI can attach) without opening a
browser. Chromium runs with a throw-away profile and every background network feature off, so taking the
screenshot neither reads the user's profile nor contacts anything.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
WINDOW_SIZE = (1280, 2000)
TIMEOUT_S = 120


class ScreenshotError(RuntimeError):
    """No browser, an unreadable report, or a browser that produced no PNG; the message is one line."""


def find_browser(candidates: Sequence[str] = BROWSERS) -> str:
    """The first installed browser among ``candidates``; ScreenshotError naming them all when none is."""
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ScreenshotError(f"no headless browser found (looked for {', '.join(candidates)}); "
                          "install one, e.g. `apt-get install chromium`")


def screenshot(report: str | Path, out: str | Path, browser: Optional[str] = None,
               window_size: tuple[int, int] = WINDOW_SIZE) -> Path:
    """Render ``report`` (an HTML file) in headless Chromium and write a PNG of the page to ``out``."""
    report, out = Path(report).resolve(), Path(out).resolve()
    if not report.is_file():
        raise ScreenshotError(f"{report} is not a file")
    browser = find_browser((browser,) if browser else BROWSERS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="geodiag-chromium-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                   f"--window-size={window_size[0]},{window_size[1]}", report.as_uri()]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"{browser} did not finish within {TIMEOUT_S} s") from None
    if not out.is_file() or out.stat().st_size == 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ScreenshotError(f"{browser} exited {result.returncode} without writing {out}: {detail}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geodiag.reports.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the HTML report to render")
    parser.add_argument("out", help="where to write the PNG")
    parser.add_argument("--browser", help="browser executable (default: the first of " + ", ".join(BROWSERS) + ")")
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.report, args.out, args.browser))
    except ScreenshotError as exc:
        print(f"screenshot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
