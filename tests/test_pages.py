"""The pages are served by the API itself: HTML, their scripts and styles, nothing from
elsewhere; a browser opens them."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser

from api.web.pages import ASSETS


async def test_the_pages_and_their_assets_are_served_with_a_strict_policy(
    http: aiohttp.ClientSession,
) -> None:
    for path in ("/console", "/buy/sale-1", *(f"/assets/{name}" for name in ASSETS)):
        async with http.get(path) as resp:
            assert resp.status == 200, path
            assert resp.headers["Content-Type"].split(";")[0] in ("text/html", *ASSETS.values())
            policy = resp.headers["Content-Security-Policy"]
            assert "default-src 'self'" in policy and "script-src 'self'" in policy
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "pages.css" in ASSETS


async def test_unknown_assets_and_bad_sale_ids_are_not_found_as_problems(
    http: aiohttp.ClientSession,
) -> None:
    for path, code in (
        ("/assets/nothing.js", "not_found"),
        ("/assets/..%2Fpages.py", "not_found"),
        ("/assets/console.html", "not_found"),
        ("/buy/" + "x" * 300, "sale_not_found"),
    ):
        async with http.get(path) as resp:
            assert resp.status == 404, path
            assert resp.content_type == "application/problem+json"
            assert (await resp.json())["code"] == code


async def test_a_browser_opens_the_console_with_its_style_and_no_errors(
    server: TestServer, browser: Browser
) -> None:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    await page.goto(str(server.make_url("/console")))
    assert await page.title() == "flashsale console"
    # The style sheet was applied (72rem at the default 16px).
    assert await page.evaluate("getComputedStyle(document.body).maxWidth") == "1152px"
    assert errors == [] and failed == []
