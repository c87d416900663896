"""A real headless Chromium (Debian's package) driven by Playwright, for tests of pages.

Playwright's own browser download needs a CDN this project cannot reach, so the browser is /usr/bin/chromium
(`make test` installs it with apt where it is missing). Every page records console errors, uncaught page errors
and failed requests, so a test can assert that none happened.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

CHROMIUM = os.environ.get("FINGERPRINT_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this closed network refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@dataclass
class PageLog:
    """What went wrong on a page: console errors, uncaught exceptions, requests that failed or got >= 400."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return self.console_errors + self.page_errors + self.failed_requests


def _watch(page: Any, log: PageLog) -> None:
    page.on("console", lambda m: log.console_errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: log.page_errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: log.failed_requests.append(f"request failed: {r.url} {r.failure}"))
    page.on("response", lambda r: log.failed_requests.append(f"HTTP {r.status}: {r.url}")
            if r.status >= 400 else None)


@pytest.fixture()
def chromium() -> Iterator[Any]:
    """A headless Chromium for one test (skips, naming the fix, where neither it nor Playwright exists).

    Per test, not per session: Playwright's sync API keeps an asyncio loop running on the main thread while it is
    started, which would break every later test that calls ``asyncio.run`` (and a second start in another module).
    """
    if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (make test does) "
                    "or set FINGERPRINT_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(chromium: Any) -> Iterator[tuple[Any, PageLog]]:
    """A fresh page (own context, 1280x900) and the log of what went wrong on it."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    log = PageLog()
    _watch(pg, log)
    try:
        yield pg, log
    finally:
        context.close()
