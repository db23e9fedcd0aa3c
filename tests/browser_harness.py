"""Headless Chromium for the tests: Debian's ``chromium`` driven through Playwright's Python API (no browser download).

``chromium_or_skip()`` returns the browser's path or skips with the reason (no binary, no Playwright); under
``CI=true`` on a machine with apt-get a missing browser is an error instead, since ``.ci/run`` installs it there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    env = os.environ.get("FDISTILL_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def chromium_or_skip() -> str:
    path = chromium_path()
    problem = None
    if path is None:
        problem = f"no Chromium binary ({', '.join(CANDIDATES)} or $FDISTILL_CHROMIUM); apt-get install -y chromium"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e .[dev])"
    if problem:
        if os.environ.get("CI") == "true" and shutil.which("apt-get"):
            pytest.fail(f"CI must run the browser tests (.ci/run installs Chromium): {problem}")
        pytest.skip(problem)
    return path


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright page in headless Chromium; the browser is closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
