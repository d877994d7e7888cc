"""The reservation lifecycle over HTTP: confirm, cancel, restock, close and expiry.

Like ``test_http``, each test runs the app on a real TCP port against a real Redis, asserts
what a client sees, and for refused requests that Redis did not change at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import re
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from api.web import requests as app_module
from api.web.app import create_app
from api.web.auth import issue_token
from api.web.openapi import document
from consumers.expiry import ExpiryWorker
from core.events import ReservationCancelled, ReservationConfirmed, StockAdjusted
from core.gateway import RedisGateway
from core.settings import Settings
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, open_sale, sale_counts
from tests.http_helpers import (
    ADMIN,
    JSON,
    ODD_BODIES,
    OTHER_SECRET,
    bearer,
    buyer,
    expect_problem,
    log_events,
    raw_http,
    redis_dump,
    sale_of,
    signed,
)

# --------------------------------------------------------------------------- helpers


async def call(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    """Send a request; return its status and JSON body, asserting problem+json on errors."""
    async with session.request(method, path, json=body, headers=headers or {}) as r:
        if r.status >= 400:
            return r.status, await expect_problem(r, r.status)
        assert r.content_type == "application/json", await r.text()
        return r.status, await r.json()


async def place(
    session: aiohttp.ClientSession, user: str, qty: int = 1, sale_id: str = "sale-1"
) -> str:
    """Reserve ``qty`` for ``user``; return the reservation id."""
    status, body = await call(
        session, "POST", f"/v1/sales/{sale_id}/reservations", buyer(user), {"qty": qty}
    )
    assert status == 202, body
    rid: str = body["reservation_id"]
    return rid


async def confirm(
    session: aiohttp.ClientSession, rid: str, headers: dict[str, str]
) -> tuple[int, Any]:
    return await call(session, "POST", f"/v1/reservations/{rid}/confirm", headers)


async def cancel(
    session: aiohttp.ClientSession, rid: str, headers: dict[str, str]
) -> tuple[int, Any]:
    return await call(session, "POST", f"/v1/reservations/{rid}/cancel", headers)


async def adjust(
    session: aiohttp.ClientSession,
    delta: Any,
    key: str | None = None,
    sale_id: str = "sale-1",
    headers: dict[str, str] = ADMIN,
) -> tuple[int, Any]:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return await call(
        session, "POST", f"/v1/sales/{sale_id}/stock", headers | extra, {"delta": delta}
    )


async def close(
    session: aiohttp.ClientSession, sale_id: str = "sale-1", headers: dict[str, str] = ADMIN
) -> tuple[int, Any]:
    return await call(session, "POST", f"/v1/sales/{sale_id}/close", headers)


async def status_of(session: aiohttp.ClientSession, rid: str, user: str) -> str:
    """The reservation's status as its buyer reads it."""
    code, body = await call(session, "GET", f"/v1/reservations/{rid}", buyer(user))
    assert code == 200, body
    status: str = body["status"]
    return status


async def counters(session: aiohttp.ClientSession, sale_id: str = "sale-1") -> dict[str, int]:
    """The sale's counters, after checking invariant 1 on them."""
    sale = await sale_of(session, sale_id)
    assert sale["remaining"] >= 0
    assert sale["remaining"] + sale["held"] + sale["confirmed"] == sale["stock"], sale
    return {k: sale[k] for k in ("stock", "remaining", "held", "confirmed", "released")}


async def event_counts(gateway: RedisGateway) -> Counter[str]:
    return Counter(type(e).__name__ for e in await log_events(gateway))


def hand_signed(payload: bytes, header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> dict[str, str]:
    """A correctly signed JWT of raw bytes that no JWT library would encode."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(header) + b"." + b64(payload)
    signature = hmac.new(JWT_SECRET.encode(), signing_input, hashlib.sha256).digest()
    return bearer((signing_input + b"." + b64(signature)).decode())


BAD_TOKENS: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic YWxpY2U6cHc="},
    bearer("garbage"),
    bearer("wrong-admin-token"),
    buyer("alice", secret=OTHER_SECRET),
    bearer(issue_token(JWT_SECRET, "alice", ttl_seconds=-60)),
    signed(),
    signed(sub=42),
    signed(sub="a b"),
    bearer(jwt.encode({"sub": "alice"}, None, algorithm="none")),
]
BAD_TOKEN_IDS = [
    "no-header",
    "empty",
    "bearer-space",
    "basic",
    "garbage",
    "wrong-admin",
    "other-secret",
    "expired",
    "no-sub",
    "numeric-sub",
    "sub-with-space",
    "alg-none",
]
UNKNOWN_RESERVATIONS = ["0-" + "0" * 32, "3-abc", "9999-abc", "nope", "x" * 300, "%C2%B2-abc"]


# ---------------------------------------------------------------------- confirm


async def test_buyer_confirms_and_a_repeat_changes_nothing(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=3)
    rid = await place(http, "alice")
    status, body = await confirm(http, rid, buyer("alice"))
    assert status == 200
    assert (body["changed"], body["status"], body["reservation_id"]) == (True, "confirmed", rid)
    assert (body["qty"], body["sale_id"], body["user_id"]) == (1, "sale-1", "alice")
    assert await status_of(http, rid, "alice") == "confirmed"
    assert await counters(http) == sale_counts(3, 2, 0, 1, 0)

    before = await redis_dump(redis_client)
    status, body = await confirm(http, rid, buyer("alice"))
    assert (status, body["changed"], body["status"]) == (200, False, "confirmed")
    assert await redis_dump(redis_client) == before
    assert (await event_counts(gateway))["ReservationConfirmed"] == 1


async def test_admin_confirms_any_buyers_reservation(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=3)
    rid = await place(http, "alice")
    status, body = await confirm(http, rid, ADMIN)
    assert (status, body["changed"], body["user_id"]) == (200, True, "alice")
    assert await status_of(http, rid, "alice") == "confirmed"
    status, body = await confirm(http, rid, buyer("alice"))  # the buyer's own retry
    assert (status, body["changed"]) == (200, False)


@pytest.mark.parametrize("route", ["confirm", "cancel"])
async def test_another_buyers_or_an_unknown_reservation_is_404(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis, route: str
):
    await open_sale(gateway)
    rid = await place(http, "alice")
    before = await redis_dump(redis_client)
    status, problem = await call(http, "POST", f"/v1/reservations/{rid}/{route}", buyer("bob"))
    assert (status, problem["code"]) == (404, "reservation_not_found")
    assert "alice" not in json.dumps(problem)  # it does not tell whose it is
    for unknown in UNKNOWN_RESERVATIONS:
        for headers in (buyer("alice"), ADMIN) if route == "confirm" else (buyer("alice"),):
            path = f"/v1/reservations/{unknown}/{route}"
            status, problem = await call(http, "POST", path, headers)
            assert (status, problem["code"]) == (404, "reservation_not_found"), unknown
    assert await redis_dump(redis_client) == before
    assert await status_of(http, rid, "alice") == "pending"


@pytest.mark.parametrize("route", ["confirm", "cancel"])
@pytest.mark.parametrize("headers", BAD_TOKENS, ids=BAD_TOKEN_IDS)
async def test_confirm_or_cancel_without_a_valid_token_is_401(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    route: str,
    headers: dict[str, str],
):
    await open_sale(gateway)
    rid = await place(http, "alice")
    before = await redis_dump(redis_client)
    async with http.post(f"/v1/reservations/{rid}/{route}", headers=headers) as r:
        await expect_problem(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis_dump(redis_client) == before


async def test_cancel_is_for_the_buyer_only_not_the_admin(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway)
    rid = await place(http, "alice")
    before = await redis_dump(redis_client)
    status, _ = await cancel(http, rid, ADMIN)
    assert status == 401
    assert await redis_dump(redis_client) == before


async def test_confirm_or_cancel_past_the_deadline_is_409_expired(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    """Before any sweep: the deadline alone refuses it; the expiry worker returns the stock."""
    await open_sale(gateway, stock=2, hold_seconds=0)
    rid = await place(http, "alice")
    before = await redis_dump(redis_client)
    for headers in (buyer("alice"), ADMIN):
        status, problem = await confirm(http, rid, headers)
        assert (status, problem["code"]) == (409, "reservation_expired")
    status, problem = await cancel(http, rid, buyer("alice"))
    assert (status, problem["code"]) == (409, "reservation_expired")
    assert await redis_dump(redis_client) == before


async def test_confirm_of_a_cancelled_reservation_is_409_closed(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=2)
    rid = await place(http, "alice")
    status, body = await cancel(http, rid, buyer("alice"))
    assert (status, body["changed"], body["status"]) == (200, True, "cancelled")
    before = await redis_dump(redis_client)
    for headers in (buyer("alice"), ADMIN):
        status, problem = await confirm(http, rid, headers)
        assert (status, problem["code"]) == (409, "reservation_closed")
    assert await redis_dump(redis_client) == before
    assert await status_of(http, rid, "alice") == "cancelled"


# ----------------------------------------------------------------------- cancel


async def test_cancel_returns_stock_and_quota_and_a_repeat_changes_nothing(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=1, per_user_limit=1)
    rid = await place(http, "alice")
    status, problem = await call(http, "POST", "/v1/sales/sale-1/reservations", buyer("bob"))
    assert (status, problem["code"]) == (409, "sold_out")

    status, body = await cancel(http, rid, buyer("alice"))
    assert (status, body["changed"], body["status"]) == (200, True, "cancelled")
    assert await status_of(http, rid, "alice") == "cancelled"
    assert await counters(http) == sale_counts(1, 1, 0, 0, 1)
    assert (await sale_of(http))["status"] == "active"

    before = await redis_dump(redis_client)
    status, body = await cancel(http, rid, buyer("alice"))
    assert (status, body["changed"], body["status"]) == (200, False, "cancelled")
    assert await redis_dump(redis_client) == before

    again = await place(http, "alice")  # the quota came back with the stock
    assert again != rid
    assert await counters(http) == sale_counts(1, 0, 1, 0, 1)
    assert (await event_counts(gateway))["ReservationCancelled"] == 1


async def test_cancel_of_a_confirmed_reservation_is_409_closed(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=2)
    rid = await place(http, "alice")
    assert (await confirm(http, rid, buyer("alice")))[0] == 200
    before = await redis_dump(redis_client)
    status, problem = await cancel(http, rid, buyer("alice"))
    assert (status, problem["code"]) == (409, "reservation_closed")
    assert await redis_dump(redis_client) == before
    assert await status_of(http, rid, "alice") == "confirmed"
    assert await counters(http) == sale_counts(2, 1, 0, 1, 0)


# ----------------------------------------------------------------------- expiry


async def test_abandoned_reservation_expires_and_its_stock_is_resold(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=2, per_user_limit=1, hold_seconds=1)
    paid = await place(http, "alice")
    abandoned = await place(http, "carol")
    status, problem = await call(http, "POST", "/v1/sales/sale-1/reservations", buyer("bob"))
    assert (status, problem["code"]) == (409, "sold_out")
    assert (await confirm(http, paid, buyer("alice")))[0] == 200  # inside the window

    await asyncio.sleep(1.05)
    assert await ExpiryWorker(gateway).sweep() == 1
    assert await status_of(http, abandoned, "carol") == "expired"
    assert await status_of(http, paid, "alice") == "confirmed"  # a paid one never expires
    assert await counters(http) == sale_counts(2, 1, 0, 1, 1)
    assert (await sale_of(http))["status"] == "active"

    before = await redis_dump(redis_client)
    status, problem = await confirm(http, abandoned, buyer("carol"))
    assert (status, problem["code"]) == (409, "reservation_expired")
    status, problem = await cancel(http, abandoned, buyer("carol"))
    assert (status, problem["code"]) == (409, "reservation_expired")
    assert await ExpiryWorker(gateway).sweep() == 0
    assert await redis_dump(redis_client) == before

    resold = await place(http, "bob")  # the abandoned unit goes to the buyer who was turned away
    status, body = await confirm(http, resold, buyer("bob"))
    assert (status, body["changed"]) == (200, True)
    assert await counters(http) == sale_counts(2, 0, 0, 2, 1)
    assert (await event_counts(gateway))["ReservationExpired"] == 1


async def test_expiry_returns_the_quota_to_the_same_buyer(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=5, per_user_limit=1, hold_seconds=0)
    first = await place(http, "alice")
    assert await ExpiryWorker(gateway).sweep() == 1
    assert await status_of(http, first, "alice") == "expired"
    second = await place(http, "alice")
    assert second != first
    assert await counters(http) == sale_counts(5, 4, 1, 0, 1)


# ------------------------------------------------------------------------ stock


async def test_restock_while_sold_out_lets_a_waiting_buyer_succeed(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=1)
    await place(http, "alice")
    status, problem = await call(http, "POST", "/v1/sales/sale-1/reservations", buyer("bob"))
    assert (status, problem["code"]) == (409, "sold_out")
    assert (await sale_of(http))["status"] == "sold_out"

    status, body = await adjust(http, 2, key="restock-1")
    assert (status, body["changed"], body["status"]) == (200, True, "active")
    assert (body["stock"], body["remaining"], body["sale_id"]) == (3, 2, "sale-1")
    assert await counters(http) == sale_counts(3, 2, 1, 0, 0)

    before = await redis_dump(redis_client)
    status, body = await adjust(http, 2, key="restock-1")  # a retry of the same request
    assert (status, body["changed"], body["stock"]) == (200, False, 3)
    assert await redis_dump(redis_client) == before

    await place(http, "bob")
    await place(http, "carol")
    assert await counters(http) == sale_counts(3, 0, 3, 0, 0)
    adjusted = [e for e in await log_events(gateway) if isinstance(e, StockAdjusted)]
    assert [e.delta for e in adjusted] == [2]


async def test_restock_without_a_key_applies_every_time(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=1)
    for expected in (2, 3):
        status, body = await adjust(http, 1)
        assert (status, body["changed"], body["stock"]) == (200, True, expected)


async def test_withdrawing_more_than_remains_unsold_is_409(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=5)
    await place(http, "alice")
    before = await redis_dump(redis_client)
    for delta in (-5, -6, -(10**9)):
        status, problem = await adjust(http, delta, key=f"withdraw{delta}")
        assert (status, problem["code"]) == (409, "not_enough_unsold_stock")
    assert await redis_dump(redis_client) == before

    status, body = await adjust(http, -4)
    assert (status, body["changed"], body["status"]) == (200, True, "sold_out")
    assert await counters(http) == sale_counts(1, 0, 1, 0, 0)


@pytest.mark.parametrize("sale_id", ["nope", "x" * 300, "x:y", "%C3%A9t%C3%A9", "%FF", "a%2Fb"])
async def test_stock_or_close_of_an_unknown_sale_is_404(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis, sale_id: str
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    for key in (None, "k1"):
        status, problem = await adjust(http, 1, key=key, sale_id=sale_id)
        assert (status, problem["code"]) == (404, "sale_not_found")
    status, problem = await close(http, sale_id)
    assert (status, problem["code"]) == (404, "sale_not_found")
    assert await redis_dump(redis_client) == before


@pytest.mark.parametrize(
    "body",
    [
        {"delta": 0},
        {"delta": "5"},
        {"delta": 1.5},
        {"delta": 1e-300},
        {"delta": True},
        {"delta": None},
        {"delta": 10**30},
        {"delta": -(10**30)},
        {},
        {"delta": 1, "sale_id": "sale-2"},
        {"qty": 1},
        [1],
        "delta",
        5,
        None,
    ],
    ids=lambda body: json.dumps(body),
)
async def test_stock_with_an_invalid_body_is_422(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis, body: Any
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    headers = ADMIN | JSON | {"Idempotency-Key": "k1"}
    async with http.post("/v1/sales/sale-1/stock", data=json.dumps(body), headers=headers) as r:
        await expect_problem(r, 422, "invalid_body")
    assert await redis_dump(redis_client) == before
    status, body = await adjust(http, 1, key="k1")  # the refused attempt did not burn the key
    assert (status, body["changed"]) == (200, True)


async def test_stock_with_malformed_json_or_no_json_is_4xx(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    path = "/v1/sales/sale-1/stock"
    async with http.post(path, data=b'{"delta": 1', headers=ADMIN | JSON) as r:
        await expect_problem(r, 400, "malformed_json")
    async with http.post(path, headers=ADMIN) as r:
        await expect_problem(r, 415, "unsupported_media_type")
    async with http.post(path, data=b"", headers=ADMIN | JSON) as r:
        await expect_problem(r, 400, "malformed_json")
    async with http.post(path, data={"delta": "1"}, headers=ADMIN) as r:
        await expect_problem(r, 415, "unsupported_media_type")
    assert await redis_dump(redis_client) == before


async def test_stock_with_a_body_over_the_limit_is_413(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    settings: Settings,
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    body = {"delta": 1, "pad": "x" * (2 * settings.max_body_bytes)}
    async with http.post("/v1/sales/sale-1/stock", json=body, headers=ADMIN) as r:
        await expect_problem(r, 413, "body_too_large")
    assert await redis_dump(redis_client) == before


@pytest.mark.parametrize(
    "path",
    [
        "/v1/reservations/0-abc/confirm",
        "/v1/reservations/0-abc/cancel",
        "/v1/sales/sale-1/stock",
        "/v1/sales/sale-1/close",
    ],
)
async def test_lifecycle_routes_take_post_only(http: aiohttp.ClientSession, path: str):
    for method in ("GET", "PUT", "DELETE"):
        async with http.request(method, path, headers=ADMIN) as r:
            await expect_problem(r, 405, "method_not_allowed")
            assert r.headers["Allow"] == "POST"


@pytest.mark.parametrize("key", ["k" * 129, "a b", "", "a/b", "ключ"])
async def test_stock_with_an_invalid_idempotency_key_is_400(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis, key: str
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    headers = ADMIN | {"Idempotency-Key": key}
    async with http.post("/v1/sales/sale-1/stock", json={"delta": 1}, headers=headers) as r:
        await expect_problem(r, 400, "bad_idempotency_key")
    assert await redis_dump(redis_client) == before


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": ADMIN_TOKEN}, 401, "unauthorized"),
        ({"Authorization": "Bearer \u00e9t\u00e9"}, 401, "unauthorized"),
        (bearer("wrong-admin-token"), 403, "forbidden"),
        (buyer("alice"), 403, "forbidden"),
    ],
    ids=["no-token", "no-scheme", "non-ascii", "wrong-token", "buyer-token"],
)
@pytest.mark.parametrize("route", ["stock", "close"])
async def test_stock_and_close_need_the_admin_token(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    headers: dict[str, str],
    status: int,
    code: str,
    route: str,
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    async with http.post(f"/v1/sales/sale-1/{route}", json={"delta": 1}, headers=headers) as r:
        await expect_problem(r, status, code)
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis_dump(redis_client) == before


# ------------------------------------------------------------------------ close


async def test_closing_a_sale_ends_it_but_keeps_pending_holds(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=5)
    pending = await place(http, "alice")
    to_cancel = await place(http, "carol")
    status, body = await close(http)
    assert (status, body["changed"], body["status"], body["sale_id"]) == (
        200,
        True,
        "ended",
        "sale-1",
    )
    assert (await sale_of(http))["status"] == "ended"

    before = await redis_dump(redis_client)
    status, body = await close(http)
    assert (status, body["changed"], body["status"]) == (200, False, "ended")
    status, problem = await call(http, "POST", "/v1/sales/sale-1/reservations", buyer("bob"))
    assert (status, problem["code"]) == (409, "sale_not_active")
    assert await redis_dump(redis_client) == before

    # Holds placed before the close keep their payment window.
    assert (await confirm(http, pending, buyer("alice")))[1]["changed"] is True
    assert (await cancel(http, to_cancel, buyer("carol")))[1]["changed"] is True
    assert await counters(http) == sale_counts(5, 4, 0, 1, 1)
    status, problem = await call(http, "POST", "/v1/sales/sale-1/reservations", buyer("carol"))
    assert (status, problem["code"]) == (409, "sale_not_active")
    assert (await event_counts(gateway))["SaleClosed"] == 1


# --------------------------------------------------------------------- contention


async def test_confirm_and_cancel_racing_one_wins(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    """Each reservation gets a confirm and a cancel at once: exactly one of them wins."""
    await open_sale(gateway, stock=60, per_user_limit=1)
    users = [f"u{i}" for i in range(40)]
    rids = [await place(http, user) for user in users]

    jitter = random.Random(11)

    async def after(delay: float, request: Awaitable[tuple[int, Any]]) -> tuple[int, Any]:
        await asyncio.sleep(delay)
        return await request

    async def race(i: int, rid: str) -> tuple[tuple[int, Any], tuple[int, Any]]:
        # Random head starts of up to 2 ms so that either side can arrive first.
        user = buyer(users[i])
        return await asyncio.gather(
            after(jitter.random() / 500, confirm(http, rid, user)),
            after(jitter.random() / 500, cancel(http, rid, user)),
        )

    # Warm up first (client connections, script cache), so that neither side starts late.
    await asyncio.gather(*(call(http, "GET", "/healthz") for _ in range(2 * len(rids))))
    warm = await place(http, "warm-1"), await place(http, "warm-2")
    assert (await confirm(http, warm[0], buyer("warm-1")))[0] == 200
    assert (await cancel(http, warm[1], buyer("warm-2")))[0] == 200
    results = await asyncio.gather(*(race(i, rid) for i, rid in enumerate(rids)))
    winners: Counter[str] = Counter()
    for (i, rid), ((c_status, c_body), (x_status, x_body)) in zip(
        enumerate(rids), results, strict=True
    ):
        if c_status == 200:
            assert c_body["changed"] is True
            assert (x_status, x_body["code"]) == (409, "reservation_closed")
            expected = "confirmed"
        else:
            assert (c_status, c_body["code"]) == (409, "reservation_closed")
            assert (x_status, x_body["changed"]) == (200, True)
            expected = "cancelled"
        winners[expected] += 1
        assert await status_of(http, rid, users[i]) == expected

    confirmed, cancelled = winners["confirmed"], winners["cancelled"]
    assert confirmed + cancelled == 40
    assert confirmed and cancelled, winners  # both sides really raced
    # Plus the two warm-up reservations: one confirmed, one cancelled.
    assert await counters(http) == sale_counts(60, 19 + cancelled, 0, confirmed + 1, cancelled + 1)
    events = await log_events(gateway)
    assert sum(isinstance(e, ReservationConfirmed) for e in events) == confirmed + 1
    assert sum(isinstance(e, ReservationCancelled) for e in events) == cancelled + 1


async def test_50_concurrent_identical_confirms_change_it_once(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=3)
    rid = await place(http, "alice")
    headers = buyer("alice")
    results = await asyncio.gather(*(confirm(http, rid, headers) for _ in range(50)))
    assert Counter(status for status, _ in results) == {200: 50}
    assert Counter(body["changed"] for _, body in results) == {True: 1, False: 49}
    assert all(body["status"] == "confirmed" for _, body in results)
    assert await counters(http) == sale_counts(3, 2, 0, 1, 0)
    assert (await event_counts(gateway))["ReservationConfirmed"] == 1


async def test_concurrent_restocks_with_one_key_apply_once(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=1)
    results = await asyncio.gather(*(adjust(http, 5, key="restock-7") for _ in range(30)))
    assert Counter(body["changed"] for _, body in results) == {True: 1, False: 29}
    assert await counters(http) == sale_counts(6, 6, 0, 0, 0)


# ----------------------------------------------------------------- hostile input


async def test_odd_input_on_lifecycle_routes_never_gives_a_500(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=5, per_user_limit=5)
    rid = await place(http, "alice")
    before = await redis_dump(redis_client)
    odd_reservations = [*UNKNOWN_RESERVATIONS, "%00", "1-%FF", "-1-abc", "0-", "%D9%A3-abc"]
    odd_sales = ["%00", "%FF%FE", "%F0%9F%9B%92", "a%2Fb", "-x", "x" * 65]
    odd_tokens = [
        {"Authorization": "Bearer \u00e9t\u00e9"},
        {"Authorization": "Bearer " + "x" * 4000},
        signed(sub=""),
        signed(sub=["alice"]),
        bearer(issue_token(JWT_SECRET, "bob")),
        hand_signed(b'{"sub": "alice", "exp": 1e400}'),
        hand_signed(b'{"sub": "alice", "iat": 1e400}'),
        hand_signed(b'{"sub": "alice", "nbf": NaN}'),
        hand_signed(b'["alice"]'),
        hand_signed(b'{"sub": "alice"}', header=b"[]"),
        hand_signed(b'{"sub": "alice"}', header=b'{"alg": "HS256", "crit": ["x"]}'),
    ]
    cases: list[tuple[str, dict[str, str], bytes | None]] = []
    for odd in odd_reservations:
        for action in ("confirm", "cancel"):
            cases += [(f"/v1/reservations/{odd}/{action}", h, None) for h in (buyer("a"), ADMIN)]
    for odd in odd_sales:
        cases += [(f"/v1/sales/{odd}/close", ADMIN, None)]
        cases += [(f"/v1/sales/{odd}/stock", ADMIN | JSON, b'{"delta": 1}')]
    for headers in odd_tokens:
        for action in ("confirm", "cancel"):
            cases += [(f"/v1/reservations/{rid}/{action}", headers, b"{}")]
        cases += [("/v1/sales/sale-1/stock", headers | JSON, b'{"delta": 1}')]
        cases += [("/v1/sales/sale-1/close", headers, None)]
    for raw in ODD_BODIES:
        cases += [("/v1/sales/sale-1/stock", ADMIN | JSON, raw)]
        cases += [(f"/v1/reservations/{rid}/confirm", buyer("bob") | JSON, raw)]
    for path, headers, data in cases:
        async with http.post(path, data=data, headers=headers) as r:
            problem = await expect_problem(r, r.status)
            assert 400 <= r.status < 500, (path, headers, data and data[:40], problem)
    assert await redis_dump(redis_client) == before
    assert await status_of(http, rid, "alice") == "pending"


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff\xfe", b"Bearer \xc3\x28", b"\xff Bearer"],
)
async def test_non_utf8_authorization_on_lifecycle_routes_is_a_4xx(
    server: TestServer, gateway: RedisGateway, redis_client: aioredis.Redis, authorization: bytes
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    for path in [
        b"/v1/reservations/0-abc/confirm",
        b"/v1/reservations/0-abc/cancel",
        b"/v1/sales/sale-1/stock",
        b"/v1/sales/sale-1/close",
    ]:
        request = (
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: 12\r\n"
            b"Authorization: " + authorization + b'\r\n\r\n{"delta": 1}'
        )
        status, head, body = await raw_http(server, request)
        assert status == 401, (path, authorization, head, body)
        assert b"application/problem+json" in head, head
    assert await redis_dump(redis_client) == before


# ------------------------------------------------------------------------ OpenAPI

SPEC = document(create_app(Settings()).router)


async def test_openapi_documents_every_registered_route(
    http: aiohttp.ClientSession, settings: Settings
):
    async with http.get("/openapi.json") as r:
        assert r.status == 200
        spec = await r.json()
    assert spec == json.loads(json.dumps(SPEC))
    app = create_app(settings)
    missing = []
    for resource in app.router.resources():
        for route in resource:
            if route.method == "HEAD":
                continue  # added next to every GET by aiohttp
            operations = spec["paths"].get(resource.canonical, {})
            if route.method.lower() not in operations:
                missing.append(f"{route.method} {resource.canonical}")
    assert not missing, missing


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_openapi_operations_are_complete_and_refs_resolve():
    schemes = SPEC["components"]["securitySchemes"]
    for ref in _refs(SPEC):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in SPEC["components"]["schemas"], ref
    for path, operations in SPEC["paths"].items():
        template = set(re.findall(r"{(\w+)}", path))
        for method, operation in operations.items():
            params = operation.get("parameters", [])
            assert {p["name"] for p in params if p["in"] == "path"} == template, (path, method)
            assert all("schema" in p and p["name"] for p in params), (path, method)
            assert operation["responses"], (path, method)
            for response in operation["responses"].values():
                assert response["description"], (path, method)
            for requirement in operation.get("security", []):
                assert requirement.keys() <= schemes.keys(), (path, method)


@pytest.mark.parametrize(
    ("path", "security", "success", "problems"),
    [
        (
            "/v1/reservations/{reservation_id}/confirm",
            [{"buyer": []}, {"admin": []}],
            "ReservationChange",
            {"401", "404", "409"},
        ),
        (
            "/v1/reservations/{reservation_id}/cancel",
            [{"buyer": []}],
            "ReservationChange",
            {"401", "404", "409"},
        ),
        (
            "/v1/sales/{sale_id}/stock",
            [{"admin": []}],
            "SaleChange",
            {"400", "401", "403", "404", "409", "415", "422"},
        ),
        ("/v1/sales/{sale_id}/close", [{"admin": []}], "SaleChange", {"401", "403", "404"}),
    ],
)
def test_openapi_documents_the_lifecycle_routes(
    path: str, security: list[dict[str, list[str]]], success: str, problems: set[str]
):
    operation = SPEC["paths"][path]["post"]
    assert operation["security"] == security
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": f"#/components/schemas/{success}"}
    assert problems <= operation["responses"].keys()
    for code in problems:
        assert "application/problem+json" in operation["responses"][code]["content"]
    changed = SPEC["components"]["schemas"][success]["properties"]["changed"]
    assert changed["type"] == "boolean"


def test_openapi_documents_the_stock_body_and_idempotency_key():
    operation = SPEC["paths"]["/v1/sales/{sale_id}/stock"]["post"]
    assert operation["requestBody"]["required"] is True
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/StockRequest"}
    schema = SPEC["components"]["schemas"]["StockRequest"]
    assert schema["required"] == ["delta"] and schema["additionalProperties"] is False
    assert schema["properties"]["delta"]["type"] == "integer"
    (key,) = [p for p in operation["parameters"] if p["in"] == "header"]
    assert (key["name"], key["required"]) == ("Idempotency-Key", False)
    # The documented patterns are the ones the app enforces.
    assert key["schema"]["pattern"] == app_module.IDEMPOTENCY_KEY.pattern
    confirm_op = SPEC["paths"]["/v1/reservations/{reservation_id}/confirm"]["post"]
    (rid,) = confirm_op["parameters"]
    assert rid["schema"]["pattern"] == app_module.RESERVATION_ID.pattern
    (sale,) = [p for p in operation["parameters"] if p["in"] == "path"]
    assert sale["schema"]["pattern"] == app_module.SALE_ID.pattern
