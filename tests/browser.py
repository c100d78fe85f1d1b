"""A real headless Chromium for the report tests (Debian's ``chromium`` driven by playwright).

Tests that use the ``browser`` fixture skip when playwright or Chromium is not installed.
``open_report`` loads a page from disk, refuses every request that does not stay on disk, and
records console errors and failed requests, so a test can assert there were none.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Debian's Chromium (or the one named by MNINORM_CHROMIUM)."""
    for candidate in (os.environ.get("MNINORM_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class PageLog:
    console_errors: list = field(default_factory=list)
    failed_requests: list = field(default_factory=list)
    outside_requests: list = field(default_factory=list)
    requests: list = field(default_factory=list)


def open_report(browser, path: Path, width: int = 1400, height: int = 1000):
    """(page, log) for ``path`` opened as a file, with only file:// requests allowed."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    log = PageLog()

    def guard(route):
        url = route.request.url
        if url.startswith(("file://", "data:", "about:")):
            route.continue_()
        else:
            log.outside_requests.append(url)
            route.abort()

    context.route("**/*", guard)
    page.on("console", lambda message: message.type == "error" and log.console_errors.append(
        message.text))  # fmt: skip
    page.on("pageerror", lambda error: log.console_errors.append(str(error)))
    page.on("requestfailed", lambda request: log.failed_requests.append(request.url))
    page.on("request", lambda request: log.requests.append(request.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, log
