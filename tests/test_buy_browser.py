"""The buyer page in a real headless Chromium, against the real API, Redis and PostgreSQL:
what a buyer sees and what the service then holds."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import jwt
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Locator, Page, Request, Route, expect

from api.web.auth import issue_token
from consumers.expiry import ExpiryWorker
from core.gateway import RedisGateway
from tests.helpers import JWT_SECRET, open_sale
from tests.http_helpers import OTHER_SECRET

SCREENSHOT = Path(__file__).parents[1] / "api" / "web" / "screenshots" / "buy.png"

PageOpener = Callable[..., Awaitable[Page]]


def token(user: str, ttl: int = 3600) -> str:
    return issue_token(JWT_SECRET, user, ttl)


@pytest.fixture
async def open_page(server: TestServer, browser: Browser) -> AsyncIterator[PageOpener]:
    """Opens /buy/{sale_id} (with ``token`` in the fragment, as ``flashsale up`` prints it)
    in a fresh browser context; fails the test on any script error or anything the
    Content-Security-Policy refused."""
    contexts = []
    errors: list[str] = []

    async def open_(sale_id: str, buyer_token: str | None = None, *, timezone: str = "UTC") -> Page:
        context = await browser.new_context(timezone_id=timezone, locale="en-GB")
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        # Refused requests and 404s are logged too (some tests cause them): only what the
        # Content-Security-Policy refused counts.
        page.on(
            "console",
            lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
        )
        fragment = f"#token={buyer_token}" if buyer_token else ""
        await page.goto(str(server.make_url(f"/buy/{sale_id}")) + fragment)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert errors == []


def buy_button(page: Page) -> Locator:
    return page.locator("#buy")


async def hold_of(page: Page, status_text: str) -> Locator:
    """The page's newest reservation, once it shows ``status_text``."""
    item = page.locator("#reservations li").first
    await expect(item.locator(".res-status")).to_have_text(status_text)
    return item


async def reservations_in_redis(gateway: RedisGateway, sale_id: str, user: str) -> list[str]:
    placed = await gateway.placed_reservations(sale_id, user)
    assert placed is not None
    return [view.reservation_id for _, view in placed]


async def test_a_buyer_buys_sees_the_hold_and_its_time_left_pays_and_sees_it_confirmed(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=3, hold_seconds=600)
    buyer_token = token("alice")
    page = await open_page("sale-1", buyer_token)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    await expect(page.locator("#token-who")).to_contain_text("Buying as alice")
    await expect(page.locator("#remaining")).to_have_text("3")
    await expect(page.locator("#sale-status")).to_have_text("On sale")
    # The token came in the fragment: it is kept for the tab and gone from the address.
    assert "#" not in page.url
    await buy_button(page).click()

    item = await hold_of(page, "Pending: held for you")
    await expect(item.locator(".res-left")).to_have_text(re.compile(r"\((10|9) min \d\d s left"))
    await expect(page.locator("#notice")).to_contain_text("Reserved 1 unit: pay by")
    await expect(page.locator("#remaining")).to_have_text("2")
    (rid,) = await reservations_in_redis(gateway, "sale-1", "alice")
    await expect(item).to_contain_text(rid)

    await item.get_by_role("button", name="Pay").click()
    await hold_of(page, "Confirmed: paid")
    await expect(page.locator("#notice")).to_have_text("Confirmed: paid, 1 unit is yours.")
    await expect(item.get_by_role("button", name="Pay")).to_be_hidden()
    reservation = await gateway.get_reservation(rid)
    assert reservation is not None and reservation.status == "confirmed"
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and (sale.confirmed, sale.held, sale.remaining) == (1, 0, 2)
    # The token went in headers only, never in an address.
    assert sent and not any(buyer_token in url for url in sent)


async def test_a_second_buyer_on_a_sold_out_sale_sees_sold_out(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=1)
    alice = await open_page("sale-1", token("alice"))
    bob = await open_page("sale-1", token("bob"))
    await expect(buy_button(bob)).to_be_enabled()
    # Bob's view of the sale stops updating (a second old, as at any moment of a flash
    # sale), so his click reaches the API after Alice's took the last unit.
    await bob.route("**/v1/sales/sale-1", lambda route: route.abort())
    await buy_button(alice).click()
    await hold_of(alice, "Pending: held for you")
    await buy_button(bob).click()
    await expect(bob.locator("#problem")).to_contain_text("Sold out")
    assert await reservations_in_redis(gateway, "sale-1", "bob") == []

    # With the live view back, the page says so before any click, and Buy is disabled.
    await bob.unroute("**/v1/sales/sale-1")
    await expect(bob.locator("#sale-status")).to_have_text("Sold out")
    await expect(bob.locator("#sale-note")).to_contain_text("Sold out")
    await expect(buy_button(bob)).to_be_disabled()
    await expect(bob.locator("#remaining")).to_have_text("0")


async def test_a_double_click_places_exactly_one_reservation(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=5, per_user_limit=3)
    page = await open_page("sale-1", token("alice"))
    keys: list[str | None] = []

    def record(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/reservations"):
            keys.append(request.headers.get("idempotency-key"))

    page.on("request", record)
    await expect(buy_button(page)).to_be_enabled()
    await buy_button(page).dblclick()
    await hold_of(page, "Pending: held for you")
    # Past the button's cool-down: a second reservation would have been placed by now.
    await page.wait_for_timeout(1500)
    await expect(page.locator("#reservations li")).to_have_count(1)
    assert len(await reservations_in_redis(gateway, "sale-1", "alice")) == 1
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and (sale.held, sale.remaining) == (1, 4)
    assert len(keys) >= 1 and len(set(keys)) == 1 and keys[0]


@pytest.mark.parametrize("lost_as", ["connection reset", "503 unavailable"])
async def test_a_purchase_whose_answer_was_lost_is_retried_with_the_same_key_and_placed_once(
    open_page: PageOpener, gateway: RedisGateway, lost_as: str
) -> None:
    await open_sale(gateway, "sale-1", stock=5, per_user_limit=3)
    page = await open_page("sale-1", token("alice"))
    keys: list[str | None] = []

    async def lose_the_first_answer(route: Route) -> None:
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) > 1:
            await route.continue_()
            return
        await route.fetch()  # the API places the reservation, and its answer is lost
        if lost_as == "connection reset":
            await route.abort("connectionreset")
        else:  # as the API answers when Redis stayed silent through its retries
            problem = {"code": "unavailable", "status": 503, "title": "Unavailable"}
            await route.fulfill(status=503, json=problem, headers={"Retry-After": "1"})

    await page.route("**/v1/sales/sale-1/reservations", lose_the_first_answer)
    await expect(buy_button(page)).to_be_enabled()
    await buy_button(page).click()
    item = await hold_of(page, "Pending: held for you")
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]
    (rid,) = await reservations_in_redis(gateway, "sale-1", "alice")
    await expect(item).to_contain_text(rid)
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and sale.held == 1


async def test_after_the_automatic_retries_try_again_sends_the_same_key(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=5)
    page = await open_page("sale-1", token("alice"))
    keys: list[str | None] = []

    async def unreachable(route: Route) -> None:
        keys.append(route.request.headers.get("idempotency-key"))
        await route.abort("connectionrefused")

    await page.route("**/v1/sales/sale-1/reservations", unreachable)
    await expect(buy_button(page)).to_be_enabled()
    await buy_button(page).click()
    await expect(page.locator("#problem")).to_contain_text("No answer from the sale", timeout=8000)
    await expect(buy_button(page)).to_have_text("Try again")
    await expect(page.locator("#qty")).to_be_disabled()
    assert len(keys) == 4 and len(set(keys)) == 1
    await page.unroute("**/v1/sales/sale-1/reservations")
    sent: list[str | None] = []
    page.on("request", lambda request: sent.append(request.headers.get("idempotency-key")))
    await buy_button(page).click()
    await hold_of(page, "Pending: held for you")
    assert keys[0] in sent
    await expect(buy_button(page)).to_have_text("Buy")
    assert len(await reservations_in_redis(gateway, "sale-1", "alice")) == 1


async def test_limit_reached_and_an_existing_hold_shown_on_reload(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=5, per_user_limit=1)
    page = await open_page("sale-1", token("alice"))
    await expect(buy_button(page)).to_be_enabled()
    # Alice buys from another device meanwhile; this page does not know yet.
    placed = await gateway.reserve("sale-1", "alice", 1, None)
    await buy_button(page).click()
    await expect(page.locator("#problem")).to_contain_text(
        "Limit reached: this sale allows 1 unit per buyer"
    )
    # The page then lists what she holds, and Buy says why it is disabled.
    item = await hold_of(page, "Pending: held for you")
    await expect(item).to_contain_text(placed.reservation_id)
    await expect(buy_button(page)).to_be_disabled()
    await expect(page.locator("#buy-why")).to_contain_text("Limit reached")
    assert len(await reservations_in_redis(gateway, "sale-1", "alice")) == 1

    # A reload (the token now from the tab's session storage) shows the hold again.
    await page.reload()
    await expect(page.locator("#token-who")).to_contain_text("Buying as alice")
    item = await hold_of(page, "Pending: held for you")
    await expect(item).to_contain_text(placed.reservation_id)
    await expect(page.locator("#notice")).to_contain_text("You hold 1 unit: pay by")
    await expect(item.get_by_role("button", name="Pay")).to_be_visible()


async def test_a_scheduled_sale_counts_down_then_opens_the_buy_button(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "later", stock=2, starts_in=120)
    later = await open_page("later", token("alice"))
    await expect(later.locator("#sale-status")).to_have_text("Not started yet")
    await expect(later.locator("#countdown")).to_have_text(
        re.compile(r"\(starts in (2 min 00|1 min 5\d) s\)")
    )
    await expect(later.locator("#sale-note")).to_contain_text("Sale not active yet: it opens at")
    await expect(buy_button(later)).to_be_disabled()

    await open_sale(gateway, "soon", stock=2, starts_in=4)
    soon = await open_page("soon", token("bob"))
    await expect(soon.locator("#countdown")).to_have_text(re.compile(r"\(starts in [1-4] s\)"))
    await expect(buy_button(soon)).to_be_disabled()
    await expect(buy_button(soon)).to_be_enabled(timeout=6000)
    await expect(soon.locator("#sale-note")).to_have_text("The sale is open.")
    await buy_button(soon).click()
    await hold_of(soon, "Pending: held for you")
    assert len(await reservations_in_redis(gateway, "soon", "bob")) == 1


async def test_a_closed_sale_is_not_active(open_page: PageOpener, gateway: RedisGateway) -> None:
    await open_sale(gateway, "sale-1", stock=2)
    page = await open_page("sale-1", token("alice"))
    await expect(buy_button(page)).to_be_enabled()
    await page.route("**/v1/sales/sale-1", lambda route: route.abort())
    await gateway.close_sale("sale-1")
    await buy_button(page).click()
    await expect(page.locator("#problem")).to_have_text(
        "Sale not active: it has ended or been closed."
    )
    await page.unroute("**/v1/sales/sale-1")
    await expect(page.locator("#sale-status")).to_have_text("Ended")
    await expect(page.locator("#sale-note")).to_have_text("Sale not active: it has ended.")
    await expect(buy_button(page)).to_be_disabled()


async def test_an_unpaid_hold_expires_on_the_page_when_the_expiry_worker_returns_it(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=1, hold_seconds=1)
    page = await open_page("sale-1", token("alice"))
    stop = asyncio.Event()
    worker = asyncio.create_task(ExpiryWorker(gateway, interval=0.1).run(stop))
    try:
        await buy_button(page).click()
        item = await hold_of(page, "Pending: held for you")
        await hold_of(page, "Expired: not paid in time")
        await expect(page.locator("#problem")).to_contain_text("Expired: the time to pay ran out")
        await expect(item.get_by_role("button", name="Pay")).to_be_hidden()
        # The unit is back on sale.
        await expect(page.locator("#remaining")).to_have_text("1")
    finally:
        stop.set()
        await worker


async def test_paying_after_the_deadline_is_refused_as_expired(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=1, hold_seconds=1)
    page = await open_page("sale-1", token("alice"))
    await buy_button(page).click()
    item = await hold_of(page, "Pending: held for you")
    # No expiry worker runs: the hold is still pending in Redis, but its time is up.
    await expect(item.locator(".res-left")).to_have_text("(time is up)")
    await item.get_by_role("button", name="Pay").click()
    await expect(page.locator("#problem")).to_have_text(
        "Expired: the time to pay ran out, and the units went back on sale."
    )
    await hold_of(page, "Expired: not paid in time")
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and sale.confirmed == 0


async def test_cancel_gives_the_stock_back(open_page: PageOpener, gateway: RedisGateway) -> None:
    await open_sale(gateway, "sale-1", stock=2)
    page = await open_page("sale-1", token("alice"))
    await buy_button(page).click()
    item = await hold_of(page, "Pending: held for you")
    await expect(page.locator("#remaining")).to_have_text("1")
    await item.get_by_role("button", name="Cancel").click()
    await hold_of(page, "Cancelled")
    await expect(page.locator("#notice")).to_have_text("Cancelled: 1 unit went back on sale.")
    await expect(page.locator("#remaining")).to_have_text("2")
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and (sale.remaining, sale.held, sale.released) == (2, 0, 1)
    # The quota came back too: she may buy again.
    await expect(buy_button(page)).to_be_enabled()


async def test_an_unknown_sale_and_bad_or_expired_tokens_are_said_plainly(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    missing = await open_page("no-such-sale", token("alice"))
    await expect(missing.locator("#sale-note")).to_have_text(
        'Sale not found: there is no sale "no-such-sale".'
    )
    await expect(buy_button(missing)).to_be_disabled()

    await open_sale(gateway, "sale-1", stock=2)
    expired = await open_page("sale-1", token("alice", ttl=-60))
    await expect(expired.locator("#token-who")).to_contain_text("this token expired at")
    await expect(buy_button(expired)).to_be_disabled()
    await expect(expired.locator("#buy-why")).to_have_text("Your token has expired.")

    forged = issue_token(OTHER_SECRET, "alice")
    page = await open_page("sale-1", forged)
    await buy_button(page).click()
    await expect(page.locator("#problem")).to_contain_text("Buyer token refused: invalid token")
    await expect(page.locator("#token")).to_be_focused()
    assert await reservations_in_redis(gateway, "sale-1", "alice") == []

    # A fresh token typed into the field works without a reload.
    await page.get_by_label("Buyer token").fill(token("alice"))
    await page.get_by_label("Buyer token").press("Enter")
    await expect(page.locator("#token-who")).to_contain_text("Buying as alice")
    await buy_button(page).click()
    await hold_of(page, "Pending: held for you")


async def test_text_from_the_token_and_the_api_is_shown_as_text_never_as_markup(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=2)
    markup = "<img src=x onerror=\"document.title='pwned'\">"
    hostile = jwt.encode(
        {"sub": markup, "exp": int(datetime.now(UTC).timestamp()) + 600}, JWT_SECRET, "HS256"
    )
    page = await open_page("sale-1", hostile)
    await expect(page.locator("#token-who")).to_have_text(re.compile(r"^Buying as <img src=x"))
    await buy_button(page).click()
    # The API refuses the subject; its detail is shown as it came.
    await expect(page.locator("#problem")).to_contain_text("token subject must be")

    # The API never puts markup in its text today, so put some into a real answer.
    async def markup_in_the_detail(route: Route) -> None:
        response = await route.fetch()
        body = await response.json()
        body.update(code="something_new", title="<b>Odd</b>", detail=markup)
        await route.fulfill(response=response, json=body)

    await page.route("**/v1/sales/sale-1/reservations", markup_in_the_detail)
    await buy_button(page).click()
    await expect(page.locator("#problem")).to_contain_text(f"<b>Odd</b> (HTTP 401): {markup}")
    assert await page.locator("main img, main b").count() == 0
    assert await page.title() == "flashsale: buy sale-1"


async def test_times_are_shown_in_the_browsers_time_zone(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    sale = await open_sale(gateway, "sale-1", stock=2, starts_in=3 * 3600)
    page = await open_page("sale-1", token("alice"), timezone="Asia/Tokyo")
    tokyo = sale.starts_at.astimezone(ZoneInfo("Asia/Tokyo"))
    await expect(page.locator("#starts-at")).to_contain_text(tokyo.strftime("%H:%M:%S"))
    await expect(page.locator("#starts-at")).to_contain_text("GMT+9")
    assert await page.locator("#starts-at").get_attribute("datetime") is not None
    await expect(page.locator("#time-zone")).to_have_text("Asia/Tokyo")
    await expect(page.locator("#countdown")).to_have_text(re.compile(r"\(starts in [23] h"))


async def test_the_keyboard_alone_buys_and_pays(
    open_page: PageOpener, gateway: RedisGateway
) -> None:
    await open_sale(gateway, "sale-1", stock=2)
    page = await open_page("sale-1")
    await expect(page.locator("#buy-why")).to_have_text("Enter your buyer token to buy.")
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Buyer token")).to_be_focused()
    await page.keyboard.type(token("alice"))
    await page.keyboard.press("Enter")
    await expect(page.locator("#token-who")).to_contain_text("Buying as alice")
    # Tab through to Buy: past Use token, Forget token and the quantity.
    for _ in range(10):
        if await page.evaluate("document.activeElement.id") == "buy":
            break
        await page.keyboard.press("Tab")
    await expect(buy_button(page)).to_be_focused()
    await page.keyboard.press("Enter")
    item = await hold_of(page, "Pending: held for you")
    for _ in range(10):
        if await page.evaluate("document.activeElement.textContent") == "Pay":
            break
        await page.keyboard.press("Tab")
    await expect(item.get_by_role("button", name="Pay")).to_be_focused()
    await page.keyboard.press("Space")
    await hold_of(page, "Confirmed: paid")
    # Focus is not lost with the Pay button gone.
    assert await page.evaluate("document.activeElement.id") == "reservations-heading"


async def test_screenshot_of_the_buyer_page(
    open_page: PageOpener, gateway: RedisGateway, tmp_path: Path
) -> None:
    """The README's picture: a hold with time left to pay. Written to ``tmp_path``, and over
    api/web/screenshots/buy.png when FLASHSALE_SCREENSHOTS=1."""
    await open_sale(gateway, "spring-drop", stock=500, per_user_limit=2, hold_seconds=600)
    for user in ("u1", "u2", "u3"):
        await gateway.reserve("spring-drop", user, 1, None)
    page = await open_page("spring-drop", token("alice"))
    await page.set_viewport_size({"width": 900, "height": 700})
    await expect(page.locator("#remaining")).to_have_text("497")
    await buy_button(page).click()
    await hold_of(page, "Pending: held for you")
    await expect(page.locator("#remaining")).to_have_text("496")
    await expect(buy_button(page)).to_be_enabled()
    shot = tmp_path / "buy.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size < 200_000
    if os.environ.get("FLASHSALE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
