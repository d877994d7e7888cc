"""The operator console in a real headless Chromium: it follows sales live, acts on them,
shows the API's errors as text, runs verify, and works from the keyboard.

A projector runs beside the app, as in ``flashsale up``: the console lists the sales that
``stock_view`` holds. ``FLASHSALE_SCREENSHOTS=<dir>`` makes the screenshot test write the
README's picture (``console.png``) there too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, Route, expect

from api.web.app import create_app
from core.settings import Settings
from tests.browser import contexts_closed_after
from tests.conftest import ProjectorFactory
from tests.helpers import ADMIN_TOKEN
from tests.http_helpers import ADMIN, reserve, sale_body

# Long enough for a projection and a poll or two on a busy machine; waits end as soon as
# the page shows what is expected.
SHOWN = 10_000
ZONE = "Asia/Tokyo"


@pytest.fixture
async def projecting(pool: asyncpg.Pool, make_projector: ProjectorFactory) -> AsyncIterator[None]:
    """A projector running until the test ends, so new sales reach ``stock_view``."""
    stop = asyncio.Event()
    task = asyncio.create_task(make_projector("console-projector").run(stop))
    yield
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def console(projecting: None, server: TestServer, browser: Browser) -> AsyncIterator[Page]:
    """The console open in a browser in Tokyo's time zone, signed in as the admin; the
    test fails if the page logged an error or a request of it failed."""
    context = await browser.new_context(timezone_id=ZONE, locale="en-GB")
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(str(server.make_url("/console")))
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Open the console").click()
    await expect(page.locator("#updated")).to_contain_text("Updated", timeout=SHOWN)
    await expect(page.get_by_label("Admin token")).to_be_hidden()
    yield page
    await context.close()
    # 4xx answers and lost answers (a reset connection) the tests provoke on purpose show
    # as failed loads in the console log.
    provoked = ("the server responded with a status of 4", "net::ERR_CONNECTION_RESET")
    assert [e for e in errors if not any(p in e for p in provoked)] == []


def row(page: Page, sale_id: str) -> Any:
    return page.locator(f'#sales tbody tr[data-sale-id="{sale_id}"]')


async def expect_counters(page: Page, sale_id: str, **counters: int) -> None:
    cells = {"stock": 3, "remaining": 4, "held": 5, "confirmed": 6, "released": 7}
    for name, value in counters.items():
        cell = row(page, sale_id).locator(f"> :nth-child({cells[name]})")
        await expect(cell).to_have_text(f"{value:,}", timeout=SHOWN)


async def open_sale(http: aiohttp.ClientSession, **overrides: Any) -> dict[str, Any]:
    async with http.post("/v1/sales", json=sale_body(**overrides), headers=ADMIN) as r:
        assert r.status == 201, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_the_console_shows_a_sale_and_follows_a_reservation_live(
    console: Page, http: aiohttp.ClientSession
) -> None:
    sale = await open_sale(http, sale_id="live", stock=10, per_user_limit=3)
    await expect_counters(console, "live", stock=10, remaining=10, held=0, confirmed=0)
    assert (await reserve(http, "ann", {"qty": 2}, sale_id="live")).status == 202
    # No reload: the next poll shows it.
    await expect_counters(console, "live", stock=10, remaining=8, held=2, released=0)
    placed = console.locator("#attempts tbody tr", has_text="placed")
    await expect(placed.locator("> :nth-child(3)")).to_have_text("1", timeout=SHOWN)
    await expect(console.locator("#partitions tbody tr")).to_have_count(4, timeout=SHOWN)
    await expect(console.locator("#dead-letters")).to_have_text("0")
    # Times in the browser's zone: the start as Tokyo's clock shows it.
    starts = row(console, "live").locator("time").first
    assert await starts.get_attribute("datetime") == sale["starts_at"]
    tokyo = datetime.fromisoformat(sale["starts_at"]).astimezone(ZoneInfo(ZONE))
    await expect(starts).to_contain_text(f"{tokyo:%H:%M:%S}")


async def test_create_restock_and_close_from_the_page(
    console: Page, http: aiohttp.ClientSession
) -> None:
    create = console.locator("#create-form")
    await create.get_by_label("Sale id").fill("from-page")
    await create.get_by_label("Stock", exact=True).fill("5")
    await create.get_by_role("button", name="Create the sale").click()
    await expect(console.get_by_role("alert")).to_have_text(
        "Sale from-page created with 5 in stock."
    )
    await expect_counters(console, "from-page", stock=5, remaining=5)

    await row(console, "from-page").get_by_role("button", name="Change sale from-page").click()
    change = console.locator("#change-form")
    await expect(change.get_by_label("Sale id")).to_have_value("from-page")
    await change.get_by_label("Stock change").fill("3")
    await change.get_by_role("button", name="Restock or withdraw").click()
    await expect(console.get_by_role("alert")).to_contain_text("Added 3 to sale from-page")
    await expect_counters(console, "from-page", stock=8, remaining=8)

    console.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await change.get_by_label("Sale id").fill("from-page")
    await change.get_by_role("button", name="Close the sale").click()
    await expect(console.get_by_role("alert")).to_have_text("Sale from-page closed.")
    await expect(row(console, "from-page").locator("td.status")).to_have_text("ended")
    async with http.get("/v1/sales/from-page") as r:
        assert {k: v for k, v in (await r.json()).items() if k in ("stock", "status")} == {
            "stock": 8,
            "status": "ended",
        }


async def test_a_write_sent_again_after_its_answer_was_lost_is_done_once(
    console: Page, http: aiohttp.ClientSession
) -> None:
    """The answer to a creation, then to a restock, is lost on its way back (the request
    reached the server and did the work); the admin sends the same form again, which
    repeats the request with the same Idempotency-Key: the second answer is the first
    write's, done once, not 409 sale_exists nor a second restock."""
    alert = console.get_by_role("alert")

    async def answer_lost(route: Route) -> None:
        await route.fetch()  # the server did it
        await route.abort("connectionreset")

    create = console.locator("#create-form")
    await create.get_by_label("Sale id").fill("lossy")
    await create.get_by_label("Stock", exact=True).fill("2")
    await console.route("**/v1/sales", answer_lost, times=1)
    await create.get_by_role("button", name="Create the sale").click()
    await expect(alert).to_contain_text("No answer")
    await create.get_by_role("button", name="Create the sale").click()
    await expect(alert).to_have_text("Sale lossy created with 2 in stock.")

    change = console.locator("#change-form")
    await change.get_by_label("Sale id").fill("lossy")
    await change.get_by_label("Stock change").fill("3")
    await console.route("**/v1/sales/lossy/stock", answer_lost, times=1)
    await change.get_by_role("button", name="Restock or withdraw").click()
    await expect(alert).to_contain_text("No answer")
    await change.get_by_role("button", name="Restock or withdraw").click()
    await expect(alert).to_contain_text("Added 3 to sale lossy: 5 remaining.")
    async with http.get("/v1/sales/lossy") as r:
        assert (await r.json())["stock"] == 5
    # A success forgets the key: the same restock typed again is a new one.
    await change.get_by_label("Stock change").fill("3")
    await change.get_by_role("button", name="Restock or withdraw").click()
    await expect(alert).to_contain_text("Added 3 to sale lossy: 8 remaining.")


async def test_the_apis_errors_are_shown_as_text(
    console: Page, http: aiohttp.ClientSession
) -> None:
    await open_sale(http, sale_id="small", stock=2)
    change = console.locator("#change-form")
    alert = console.get_by_role("alert")
    await change.get_by_label("Sale id").fill("small")
    await change.get_by_label("Stock change").fill("-5")
    await change.get_by_role("button", name="Restock or withdraw").click()
    await expect(alert).to_contain_text("Not enough unsold stock")
    await expect(alert.locator("code")).to_have_text("not_enough_unsold_stock")

    # A detail that quotes what was typed: shown as the characters, never as markup.
    typed = '<img src="/nothing" onerror="window.pwned = 1">'
    await change.get_by_label("Sale id").fill(typed)
    await change.get_by_label("Stock change").fill("1")
    await change.get_by_role("button", name="Restock or withdraw").click()
    await expect(alert).to_contain_text(f"Sale not found: no sale '{typed}'")
    assert await alert.locator("img").count() == 0
    assert await console.evaluate("window.pwned") is None

    create = console.locator("#create-form")
    await create.get_by_label("Sale id").fill("small")
    await create.get_by_label("Stock", exact=True).fill("1")
    await create.get_by_role("button", name="Create the sale").click()
    await expect(alert).to_contain_text("Sale already exists")
    await create.get_by_label("Sale id").fill("bad id!")
    await create.get_by_role("button", name="Create the sale").click()
    await expect(alert.locator("li")).to_contain_text("sale_id: String should match pattern")


async def test_a_wrong_token_is_refused_and_asked_again(server: TestServer, browser: Browser):
    page = await browser.new_page()
    await page.goto(str(server.make_url("/console")))
    await page.get_by_label("Admin token").fill("not-the-token")
    await page.get_by_role("button", name="Open the console").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "Forbidden: admin token required (forbidden)", timeout=SHOWN
    )
    await expect(page.get_by_label("Admin token")).to_be_focused()
    assert await page.evaluate("sessionStorage.length") == 0
    await page.close()


async def test_each_test_finds_the_shared_browser_without_the_last_ones_contexts(
    server: TestServer, browser: Browser
) -> None:
    """Chromium serves the whole session: the contexts a test opens are closed after it,
    and a new one holds nothing of another's storage or cookies."""
    assert browser.contexts == []  # the earlier tests' are closed
    url = str(server.make_url("/console"))
    async with contexts_closed_after(browser):  # what the fixture does after each test
        left_open = await browser.new_page()
        await left_open.goto(url)
        await left_open.evaluate("localStorage.setItem('k', 'v'); sessionStorage.setItem('k', 'v')")
        await left_open.context.add_cookies([{"name": "c", "value": "v", "url": url}])
    assert browser.contexts == []
    fresh = await browser.new_page()
    await fresh.goto(url)
    seen = await fresh.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert seen == [0, 0, ""]


async def test_without_a_database_the_console_says_so_and_shows_the_rest(
    settings: Settings, redis_client: aioredis.Redis, browser: Browser
) -> None:
    no_database = settings.model_copy(update={"database_url": None})
    async with TestServer(create_app(no_database, redis_client)) as server:
        page = await browser.new_page()
        await page.goto(str(server.make_url("/console")))
        await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
        await page.get_by_role("button", name="Open the console").click()
        await expect(page.locator("#poll-problem")).to_contain_text(
            "Service temporarily unavailable: no database configured", timeout=SHOWN
        )
        await expect(page.locator("#dead-letters")).to_have_text("0")
        await page.close()


async def test_the_verify_button_shows_the_result(
    console: Page, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    await open_sale(http, sale_id="checked", stock=4)
    await expect_counters(console, "checked", stock=4)
    summary = console.locator("#verify-summary")
    await expect(summary).to_have_text("No verify has run yet.")
    await console.get_by_role("button", name="Run verify").click()
    await expect(summary).to_contain_text("Clean: 1 sale, 1 event agree", timeout=SHOWN)
    keys = [k async for k in redis_client.scan_iter(match="*:sale:checked")]
    await redis_client.hset(keys[0], "remaining", 1)
    await console.get_by_role("button", name="Run verify").click()
    await expect(summary).to_contain_text("Drift:", timeout=SHOWN)
    drift = console.locator("#verify-rows tbody tr", has_text="remaining")
    await expect(drift).to_contain_text("checked")
    await expect(drift.locator("td").nth(2)).to_have_text("4")  # the log's value
    await expect(drift.locator("td").nth(3)).to_have_text("1")  # Redis's


async def test_keyboard_alone_signs_in_and_creates_a_sale(
    projecting: None, server: TestServer, browser: Browser, http: aiohttp.ClientSession
) -> None:
    page = await browser.new_page()
    await page.goto(str(server.make_url("/console")))
    await expect(page.get_by_label("Admin token")).to_be_focused()
    await page.keyboard.type(ADMIN_TOKEN)
    await page.keyboard.press("Enter")
    await expect(page.locator("#console-title")).to_be_focused(timeout=SHOWN)
    await tab_to(page, "create-sale")
    await page.keyboard.type("by-keys")
    await page.keyboard.press("Tab")
    await page.keyboard.type("7")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert")).to_have_text("Sale by-keys created with 7 in stock.")
    await expect_counters(page, "by-keys", stock=7, remaining=7)
    await tab_to(page, "run-verify")
    await page.keyboard.press("Enter")
    await expect(page.locator("#verify-summary")).to_contain_text("Clean", timeout=SHOWN)
    await expect(page.get_by_role("button", name="Run verify")).to_be_focused()
    await page.close()


async def tab_to(page: Page, element_id: str) -> None:
    """Press Tab until the element has the focus (the test fails if it never does)."""
    for _ in range(60):
        if await page.evaluate("document.activeElement.id") == element_id:
            return
        await page.keyboard.press("Tab")
    await expect(page.locator(f"#{element_id}")).to_be_focused()


async def test_a_screenshot_of_the_console(
    console: Page, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The README's picture: a few sales mid-flight, a clean verify."""
    sales = (("summer-drop", 500, 180), ("flash-42", 20, 20), ("late", 50, 0))
    for sale_id, stock, buyers in sales:
        await open_sale(http, sale_id=sale_id, stock=stock, per_user_limit=2)
        for i in range(buyers):
            await reserve(http, f"user-{i}", {"qty": 1 + i % 2}, sale_id=sale_id)
    async with http.post("/v1/sales/late/close", headers=ADMIN):
        pass
    # Everything shown and projected before the picture.
    await expect_counters(console, "summer-drop", held=270)
    await expect_counters(console, "flash-42", remaining=0, held=20)
    await expect(row(console, "late").locator("td.status")).to_have_text("ended", timeout=SHOWN)
    await expect(console.locator("#total-lag")).to_have_text("0", timeout=SHOWN)
    await console.get_by_role("button", name="Run verify").click()
    await expect(console.locator("#verify-summary")).to_contain_text("Clean", timeout=SHOWN)
    await console.set_viewport_size({"width": 1200, "height": 900})
    shot = await console.screenshot(full_page=True, type="png")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("FLASHSALE_SCREENSHOTS")
    for directory in (str(tmp_path), *([target] if target else [])):
        await asyncio.to_thread(Path(directory, "console.png").write_bytes, shot)
