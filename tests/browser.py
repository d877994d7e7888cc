"""A real headless browser for the page tests: Debian's ``chromium`` driven by Playwright
(Playwright's own browser download cannot be had everywhere, so it is not used).
``FLASHSALE_CHROMIUM`` names another executable; .ci/run installs the Debian package.

Starting Playwright and Chromium takes a second or two, so the session starts them once
(``chromium`` in tests/conftest.py) and each test works in browser contexts of its own,
closed after it (:func:`contexts_closed_after`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Browser, async_playwright

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_executable() -> str | None:
    """The browser to drive: ``FLASHSALE_CHROMIUM``, else the first of CANDIDATES on PATH."""
    named = os.environ.get("FLASHSALE_CHROMIUM")
    if named:
        return named
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[Browser]:
    """A headless Chromium, closed after; the test skips, saying why, without one."""
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no chromium on PATH: apt-get install chromium (or set FLASHSALE_CHROMIUM)")
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def contexts_closed_after(browser: Browser) -> AsyncIterator[None]:
    """Close every context of ``browser`` opened inside the block (a test's), with their
    pages: the next test finds the browser as this one did."""
    before = set(browser.contexts)
    try:
        yield
    finally:
        for context in browser.contexts:
            if context not in before:
                await context.close()
