"""The HTTP API on a real TCP port against a real Redis.

Each test asserts what a client sees (status, headers, problem+json body) and, for refused
requests, that Redis did not change at all: no counter moved and no event was appended.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from api.web.auth import issue_token
from api.web.requests import BadRequest, validate
from api.web.reservations import ReservationRequest
from core.events import SaleCreated
from core.gateway import RedisGateway
from core.settings import Settings
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, open_sale
from tests.http_helpers import (
    ADMIN,
    JSON,
    ODD_BODIES,
    OTHER_SECRET,
    bearer,
    buyer,
    expect_problem,
    log_events,
    placed_ids,
    raw_http,
    redis_dump,
    reserve,
    sale_body,
    sale_of,
    serve,
    signed,
)

# ------------------------------------------------------------------ POST /v1/sales


async def test_admin_creates_a_sale(http: aiohttp.ClientSession, gateway: RedisGateway):
    async with http.post("/v1/sales", json=sale_body(per_user_limit=2), headers=ADMIN) as r:
        assert r.status == 201
        assert r.headers["Location"] == "/v1/sales/sale-1"
        body = await r.json()
    assert (body["sale_id"], body["stock"], body["remaining"]) == ("sale-1", 10, 10)
    assert (body["held"], body["per_user_limit"], body["status"]) == (0, 2, "active")
    events = await log_events(gateway)
    assert len(events) == 1 and isinstance(events[0], SaleCreated)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong-admin-token"}, 403, "forbidden"),
        ({"Authorization": ADMIN_TOKEN}, 401, "unauthorized"),
        (buyer("alice"), 403, "forbidden"),
    ],
    ids=["no-token", "wrong-token", "no-scheme", "buyer-token"],
)
async def test_create_sale_needs_the_admin_token(
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    headers: dict[str, str],
    status: int,
    code: str,
):
    async with http.post("/v1/sales", json=sale_body(), headers=headers) as r:
        await expect_problem(r, status, code)
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis_dump(redis_client) == {}


async def test_create_existing_sale_is_409_and_changes_nothing(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=3)
    before = await redis_dump(redis_client)
    async with http.post("/v1/sales", json=sale_body(stock=99), headers=ADMIN) as r:
        await expect_problem(r, 409, "sale_exists")
    assert await redis_dump(redis_client) == before
    assert (await sale_of(http))["stock"] == 3


async def test_create_repeated_with_its_idempotency_key_answers_the_sale_once(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    """A creation repeated with its Idempotency-Key and body (its answer lost, or 503
    not_replicated) answers the sale again and opens it once; the key with other values is
    422, and the same body with another key, or none, is 409."""
    keyed = ADMIN | {"Idempotency-Key": "open-1"}
    body = sale_body(stock=5, starts_at="2030-01-01T00:00:00Z")
    async with http.post("/v1/sales", json=body, headers=keyed) as r:
        assert r.status == 201
        first = await r.json()
    after_first = await redis_dump(redis_client)
    async with http.post("/v1/sales", json=body, headers=keyed) as r:
        assert (r.status, r.headers["Location"]) == (201, "/v1/sales/sale-1")
        assert await r.json() == first
    assert await redis_dump(redis_client) == after_first
    assert [type(e) for e in await log_events(gateway)] == [SaleCreated]

    async with http.post("/v1/sales", json=sale_body(stock=6), headers=keyed) as r:
        await expect_problem(r, 422, "idempotency_key_reused")
    for headers in (ADMIN | {"Idempotency-Key": "open-2"}, ADMIN):
        async with http.post("/v1/sales", json=body, headers=headers) as r:
            await expect_problem(r, 409, "sale_exists")
    assert await redis_dump(redis_client) == after_first


async def test_a_create_without_start_repeated_with_its_key_is_the_same_request(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    """A body without starts_at means "now" each time it is sent: the repeat is still the
    same request, not a reuse of the key."""
    keyed = ADMIN | {"Idempotency-Key": "open-now"}
    for _ in range(2):
        async with http.post("/v1/sales", json=sale_body(), headers=keyed) as r:
            assert r.status == 201, await r.text()
    assert len(await log_events(gateway)) == 1


@pytest.mark.parametrize(
    "body",
    [
        sale_body(stock="5"),
        sale_body(stock=-1),
        sale_body(stock=1.5),
        sale_body(stock=True),
        sale_body(stock=10**30),
        sale_body(colour="red"),
        sale_body(sale_id="a b"),
        sale_body(sale_id="x:y"),
        sale_body(sale_id=""),
        sale_body(sale_id="s" * 65),
        sale_body(sale_id="sale-1\n"),
        sale_body(per_user_limit=0),
        sale_body(hold_seconds=-1),
        sale_body(starts_at="2030-01-01T00:00:00"),
        sale_body(starts_at="2030-01-01T00:00:00Z", ends_at="2029-01-01T00:00:00Z"),
        {"sale_id": "sale-1"},
        [],
        None,
        "sale-1",
    ],
    ids=lambda body: json.dumps(body)[:40],
)
async def test_create_sale_with_an_invalid_body_is_422(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, body: Any
):
    async with http.post("/v1/sales", data=json.dumps(body), headers=ADMIN | JSON) as r:
        problem = await expect_problem(r, 422, "invalid_body")
    assert problem["errors"] and all({"loc", "msg", "type"} <= e.keys() for e in problem["errors"])
    assert await redis_dump(redis_client) == {}


async def test_create_sale_with_malformed_json_is_400(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
):
    async with http.post("/v1/sales", data=b'{"sale_id": "s",', headers=ADMIN | JSON) as r:
        await expect_problem(r, 400, "malformed_json")
    assert await redis_dump(redis_client) == {}


async def test_create_sale_with_another_content_type_is_415(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
):
    form = {"sale_id": "sale-1", "stock": "5"}
    async with http.post("/v1/sales", data=form, headers=ADMIN) as r:
        await expect_problem(r, 415, "unsupported_media_type")
    text = {"Content-Type": "text/plain"}
    async with http.post("/v1/sales", data=json.dumps(sale_body()), headers=ADMIN | text) as r:
        await expect_problem(r, 415, "unsupported_media_type")
    assert await redis_dump(redis_client) == {}


async def test_create_sale_with_a_body_over_the_limit_is_413(
    http: aiohttp.ClientSession, settings: Settings, redis_client: aioredis.Redis
):
    body = sale_body(padding="x" * (settings.max_body_bytes + 1))
    async with http.post("/v1/sales", json=body, headers=ADMIN) as r:
        await expect_problem(r, 413, "body_too_large")
    assert await redis_dump(redis_client) == {}


@pytest.mark.parametrize(
    ("field", "moment"),
    [
        ("starts_at", "9999-12-31T23:59:59-05:00"),
        ("ends_at", "9999-12-31T23:59:59-05:00"),
        ("starts_at", "0001-01-01T00:00:00+05:00"),
        ("starts_at", "1969-12-31T23:59:59Z"),
    ],
)
async def test_create_sale_with_a_time_that_cannot_be_read_back_is_422(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, field: str, moment: str
):
    """Regression: such a sale used to be written, answered 500, and then 500 on every read."""
    async with http.post("/v1/sales", json=sale_body(**{field: moment}), headers=ADMIN) as r:
        problem = await expect_problem(r, 422, "invalid_body")
    assert [e["loc"] for e in problem["errors"]] == [[field]]
    assert await redis_dump(redis_client) == {}
    async with http.get("/v1/sales/sale-1") as r:
        await expect_problem(r, 404, "sale_not_found")


# ------------------------------------------------------------- GET /v1/sales/{id}


async def test_get_sale_shows_its_counters(http: aiohttp.ClientSession, gateway: RedisGateway):
    await open_sale(gateway, stock=5, per_user_limit=2)
    assert (await reserve(http, "alice", {"qty": 2})).status == 202
    sale = await sale_of(http)
    assert {k: sale[k] for k in ("stock", "remaining", "held", "confirmed", "status")} == {
        "stock": 5,
        "remaining": 3,
        "held": 2,
        "confirmed": 0,
        "status": "active",
    }


@pytest.mark.parametrize(
    "sale_id", ["nope", "s" * 300, "x:y", "a%20b", "%C3%A9t%C3%A9", "sale-1%0A", "%00"]
)
async def test_get_unknown_sale_is_404(
    http: aiohttp.ClientSession, gateway: RedisGateway, sale_id: str
):
    await open_sale(gateway)
    async with http.get(f"/v1/sales/{sale_id}") as r:
        await expect_problem(r, 404, "sale_not_found")


async def test_a_sale_starting_later_is_scheduled(http: aiohttp.ClientSession):
    starts_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    body = sale_body(starts_at=starts_at)
    async with http.post("/v1/sales", json=body, headers=ADMIN) as r:
        assert r.status == 201
        assert (await r.json())["status"] == "scheduled"
    assert (await sale_of(http))["status"] == "scheduled"


async def test_a_sale_is_sold_out_after_its_last_unit(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=2)
    assert (await sale_of(http))["status"] == "active"
    for user in ("alice", "bob"):
        assert (await reserve(http, user)).status == 202
    sale = await sale_of(http)
    assert (sale["status"], sale["remaining"], sale["held"]) == ("sold_out", 0, 2)


# ---------------------------------------------- POST /v1/sales/{id}/reservations


async def test_reserve_holds_stock_and_answers_202(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=5, per_user_limit=3, hold_seconds=60)
    response = await reserve(http, "alice", {"qty": 3})
    assert response.status == 202
    body = await response.json()
    assert body["status"] == "pending" and body["expires_at"]
    assert response.headers["Location"] == f"/v1/reservations/{body['reservation_id']}"
    assert await placed_ids(gateway) == [body["reservation_id"]]
    async with http.get(response.headers["Location"], headers=buyer("alice")) as r:
        assert r.status == 200
        reservation = await r.json()
    assert (reservation["qty"], reservation["status"], reservation["sale_id"]) == (
        3,
        "pending",
        "sale-1",
    )
    # Regression: the 202 wrote "+00:00" while every read wrote "Z" for the same instant.
    assert reservation["expires_at"] == body["expires_at"]


async def test_reserve_without_a_body_reserves_one(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=5)
    async with http.post("/v1/sales/sale-1/reservations", headers=buyer("alice")) as r:
        assert r.status == 202
    sale = await sale_of(http)
    assert (sale["remaining"], sale["held"]) == (4, 1)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic YWxpY2U6cHc="},
        bearer("garbage"),
        bearer("a.b.c"),
        bearer(ADMIN_TOKEN),
        buyer("alice", secret=OTHER_SECRET),
        bearer(issue_token(JWT_SECRET, "alice", ttl_seconds=-60)),
        signed(),
        signed(sub=""),
        signed(sub="a b"),
        signed(sub="alice\n"),
        signed(sub=42),
        bearer(jwt.encode({"sub": "alice"}, None, algorithm="none")),
    ],
    ids=[
        "no-header",
        "empty-header",
        "bearer-alone",
        "bearer-space",
        "basic",
        "garbage",
        "three-dots",
        "admin-token",
        "other-secret",
        "expired",
        "no-sub",
        "empty-sub",
        "sub-with-space",
        "sub-with-newline",
        "numeric-sub",
        "alg-none",
    ],
)
async def test_reserve_without_a_valid_buyer_token_is_401(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    headers: dict[str, str],
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    async with http.post("/v1/sales/sale-1/reservations", json={"qty": 1}, headers=headers) as r:
        await expect_problem(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert await redis_dump(redis_client) == before


@pytest.mark.parametrize(
    ("sale", "first", "code"),
    [
        ({"stock": 1, "per_user_limit": 5}, "bob", "sold_out"),
        ({"stock": 5, "per_user_limit": 1}, "alice", "limit_reached"),
        ({"stock": 5, "starts_in": 3600}, None, "sale_not_active"),
    ],
)
async def test_refused_reservation_is_409_and_changes_nothing(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    sale: dict[str, Any],
    first: str | None,
    code: str,
):
    await open_sale(gateway, **sale)
    if first is not None:
        assert (await reserve(http, first)).status == 202
    before = await redis_dump(redis_client)
    async with http.post(
        "/v1/sales/sale-1/reservations", json={"qty": 1}, headers=buyer("alice")
    ) as r:
        await expect_problem(r, 409, code)
    assert await redis_dump(redis_client) == before


async def test_reserve_in_an_unknown_sale_is_404(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
):
    response = await reserve(http, "alice", {"qty": 1}, sale_id="nope")
    await expect_problem(response, 404, "sale_not_found")
    response = await reserve(http, "alice", {"qty": 1}, sale_id="x" * 300)
    await expect_problem(response, 404, "sale_not_found")
    assert await redis_dump(redis_client) == {}


@pytest.mark.parametrize(
    "body",
    [
        {"qty": 0},
        {"qty": -1},
        {"qty": "1"},
        {"qty": 1.5},
        {"qty": 1e-300},
        {"qty": True},
        {"qty": None},
        {"qty": 10**30},
        {"qty": 1, "sale_id": "sale-2"},
        [1],
        "qty",
        1,
        None,
    ],
    ids=lambda body: json.dumps(body),
)
async def test_reserve_with_an_invalid_body_is_422(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis, body: Any
):
    await open_sale(gateway, stock=5, per_user_limit=5)
    before = await redis_dump(redis_client)
    async with http.post(
        "/v1/sales/sale-1/reservations", data=json.dumps(body), headers=buyer("alice") | JSON
    ) as r:
        await expect_problem(r, 422, "invalid_body")
    assert await redis_dump(redis_client) == before


async def test_reserve_with_malformed_json_is_400(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    async with http.post(
        "/v1/sales/sale-1/reservations", data=b"{qty: 1}", headers=buyer("alice") | JSON
    ) as r:
        await expect_problem(r, 400, "malformed_json")
    assert await redis_dump(redis_client) == before


def _answer_of_the_long_way(raw: bytes) -> tuple[int, str, str, Any] | None:
    """(status, code, detail, errors) of ``json.loads`` then ``validate`` (None: valid)."""
    try:
        validate(ReservationRequest, json.loads(raw))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError alike
        return 400, "malformed_json", f"body is not valid JSON: {e}", None
    except RecursionError:
        return 400, "malformed_json", "body is nested too deeply", None
    except BadRequest as e:
        return e.status, e.code, e.detail, e.extra.get("errors")
    return None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"qty": 5, "qty": 0}',
        b'{"qty": 2, "qty": "2"}',
        b'{"qty": NaN}',
        b'{"qty": Infinity}',
        b'{"qty": 1e0}',
        b'{"qty": 1}  x',
        b"\xef\xbb\xbf{}",
        b'{"qty": "\xff"}',
        b'{"q\\u0074y": 0}',
        b'{"qty": 1, "\\ud800": 1}',
        '{"qty": 0}'.encode("utf-16"),
        '{"qty": 1}'.encode("utf-16"),
        b"  ",
        b"[" * 5000 + b"]" * 5000,
    ],
)
async def test_reserve_odd_raw_bodies_get_the_answer_of_json_loads_then_validate(
    http: aiohttp.ClientSession, gateway: RedisGateway, raw: bytes
):
    await open_sale(gateway)
    answer = _answer_of_the_long_way(raw)
    async with http.post(
        "/v1/sales/sale-1/reservations", data=raw, headers=buyer("alice") | JSON
    ) as r:
        if answer is None:  # json.loads takes a BOM or UTF-16; the body is valid as before
            assert r.status == 202, await r.text()
            return
        problem = await expect_problem(r, answer[0], answer[1])
    assert (problem["detail"], problem.get("errors")) == answer[2:]


async def test_reserve_with_a_body_over_the_limit_is_413(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    settings: Settings,
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    body = {"qty": 1, "pad": "x" * (4 * settings.max_body_bytes)}
    response = await reserve(http, "alice", body)
    await expect_problem(response, 413, "body_too_large")
    assert await redis_dump(redis_client) == before


async def test_repeated_idempotency_key_returns_the_same_reservation(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=5, per_user_limit=5)
    first = await reserve(http, "alice", {"qty": 2}, key="order-42")
    again = await reserve(http, "alice", {"qty": 2}, key="order-42")
    assert (first.status, again.status) == (202, 202)
    first_body, again_body = await first.json(), await again.json()
    assert again_body["reservation_id"] == first_body["reservation_id"]
    assert again_body["status"] == "pending"
    assert again_body["expires_at"] == first_body["expires_at"]
    assert again.headers["Location"] == first.headers["Location"]
    sale = await sale_of(http)
    assert (sale["remaining"], sale["held"]) == (3, 2)
    assert await placed_ids(gateway) == [first_body["reservation_id"]]


async def test_same_idempotency_key_of_another_buyer_is_another_reservation(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=5)
    alice = await reserve(http, "alice", key="k1")
    bob = await reserve(http, "bob", key="k1")
    assert (alice.status, bob.status) == (202, 202)
    assert (await alice.json())["reservation_id"] != (await bob.json())["reservation_id"]


async def test_idempotency_key_reused_with_another_qty_is_422(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=5, per_user_limit=5)
    assert (await reserve(http, "alice", {"qty": 1}, key="order-42")).status == 202
    before = await redis_dump(redis_client)
    response = await reserve(http, "alice", {"qty": 2}, key="order-42")
    await expect_problem(response, 422, "idempotency_key_reused")
    assert await redis_dump(redis_client) == before


@pytest.mark.parametrize("key", ["k" * 129, "k" * 200, "a b", "", "a/b", "ключ"])
async def test_invalid_idempotency_key_is_400(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis, key: str
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    response = await reserve(http, "alice", {"qty": 1}, key=key)
    await expect_problem(response, 400, "bad_idempotency_key")
    assert await redis_dump(redis_client) == before


# ----------------------------------------------------- GET /v1/reservations/{id}


async def test_reservation_is_visible_to_its_buyer_and_admin_only(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway)
    location = (await reserve(http, "alice")).headers["Location"]
    async with http.get(location, headers=buyer("alice")) as r:
        assert r.status == 200
        assert (await r.json())["user_id"] == "alice"
    async with http.get(location, headers=ADMIN) as r:
        assert r.status == 200
        assert (await r.json())["user_id"] == "alice"
    async with http.get(location, headers=buyer("bob")) as r:
        await expect_problem(r, 404, "reservation_not_found")
    async with http.get(location) as r:
        await expect_problem(r, 401, "unauthorized")
    async with http.get(location, headers=buyer("alice", secret=OTHER_SECRET)) as r:
        await expect_problem(r, 401, "unauthorized")


@pytest.mark.parametrize(
    "reservation_id",
    [
        "0-" + "0" * 32,
        "nope",
        "-abc",
        "0-",
        "9999-abc",
        "99999999-abc",
        "x" * 300,
        "%C2%B2-abc",  # a superscript two is a "digit" to str.isdigit but not to int()
        "%D9%A3-abc",  # an Arabic-Indic three
        "%00",
    ],
)
async def test_unknown_or_malformed_reservation_is_404(
    http: aiohttp.ClientSession, reservation_id: str
):
    async with http.get(f"/v1/reservations/{reservation_id}", headers=buyer("alice")) as r:
        await expect_problem(r, 404, "reservation_not_found")
    async with http.get(f"/v1/reservations/{reservation_id}", headers=ADMIN) as r:
        await expect_problem(r, 404, "reservation_not_found")


# ------------------------------------------------------------ operational routes


async def test_health_and_readiness(http: aiohttp.ClientSession):
    async with http.get("/healthz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"
    async with http.get("/readyz") as r:
        assert r.status == 200
        assert (await r.json())["redis"] == "ok"


async def test_metrics_count_reservation_attempts(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=1)
    assert (await reserve(http, "alice")).status == 202
    assert (await reserve(http, "bob")).status == 409
    async with http.get("/metrics") as r:
        assert r.status == 200
        assert r.content_type.startswith("text/plain")
        text = await r.text()
    assert 'flashsale_reservation_attempts_total{outcome="placed"} 1.0' in text
    assert 'flashsale_reservation_attempts_total{outcome="sold_out"} 1.0' in text
    assert "flashsale_http_requests_total" in text


async def test_openapi_document_lists_the_routes(http: aiohttp.ClientSession):
    async with http.get("/openapi.json") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        spec = await r.json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/sales", "/v1/sales/{sale_id}/reservations"} <= spec["paths"].keys()


# ------------------------------------------------------------------------ routing


@pytest.mark.parametrize("path", ["/nope", "/v1", "/v1/sales/", "/v1/sales/s/x"])
async def test_unknown_route_is_404_problem(http: aiohttp.ClientSession, path: str):
    async with http.get(path) as r:
        await expect_problem(r, 404)


async def test_wrong_method_is_405_problem(http: aiohttp.ClientSession):
    async with http.put("/v1/sales") as r:
        await expect_problem(r, 405, "method_not_allowed")
        assert {"GET", "POST"} <= set(r.headers["Allow"].split(","))
    async with http.delete("/v1/sales/sale-1", headers=ADMIN) as r:
        await expect_problem(r, 405, "method_not_allowed")


# -------------------------------------------------------------------- contention


async def test_3000_concurrent_reservations_sell_exactly_the_stock(
    settings: Settings, redis_client: aioredis.Redis, gateway: RedisGateway
):
    """1,500 buyers, two attempts each, all at once: 100 sold to 100 buyers, no oversell."""
    await open_sale(gateway, stock=100, per_user_limit=1)
    users = [f"u{i}" for i in range(1500)]
    tokens = {user: buyer(user) for user in users}
    attempts: list[tuple[str, str | None]] = []
    for i, user in enumerate(users):
        attempts += [(user, f"{user}-a"), (user, f"{user}-b" if i % 2 else None)]
    random.Random(7).shuffle(attempts)

    async def attempt(session: aiohttp.ClientSession, user: str, key: str | None) -> Any:
        headers = tokens[user] | ({"Idempotency-Key": key} if key else {})
        async with session.post(
            "/v1/sales/sale-1/reservations", json={"qty": 1}, headers=headers
        ) as r:
            return user, r.status, await r.json(content_type=None)

    async with serve(settings, redis_client, connections=200) as session:
        started = time.monotonic()
        results = await asyncio.gather(*(attempt(session, u, k) for u, k in attempts))
        elapsed = time.monotonic() - started
        sale = await sale_of(session)

    accepted = [(user, body) for user, status, body in results if status == 202]
    refused = Counter((status, body["code"]) for _, status, body in results if status != 202)
    assert len(accepted) == 100
    assert len({user for user, _ in accepted}) == 100
    assert set(refused) <= {(409, "sold_out"), (409, "limit_reached")}, refused
    assert sum(refused.values()) == 2900
    assert (sale["remaining"], sale["held"], sale["status"]) == (0, 100, "sold_out")
    assert sorted(await placed_ids(gateway)) == sorted(
        body["reservation_id"] for _, body in accepted
    )
    assert elapsed < 45, f"3,000 requests took {elapsed:.1f}s"


async def test_requests_over_max_inflight_are_turned_away_with_429(
    settings: Settings, redis_client: aioredis.Redis, gateway: RedisGateway
):
    await open_sale(gateway, stock=1000, per_user_limit=1)
    tight = settings.model_copy(update={"max_inflight": 1})

    async def attempt(session: aiohttp.ClientSession, user: str) -> tuple[int, str, Any]:
        async with session.post(
            "/v1/sales/sale-1/reservations", json={"qty": 1}, headers=buyer(user)
        ) as r:
            body = await r.json(content_type=None)
            if r.status == 429:
                await expect_problem(r, 429, "turned_away")
                assert int(r.headers["Retry-After"]) >= 1
            return r.status, r.headers.get("Retry-After", ""), body

    async with serve(tight, redis_client, connections=100) as session:
        results = await asyncio.gather(*(attempt(session, f"u{i}") for i in range(300)))
        sale = await sale_of(session)

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {202, 429}, statuses
    assert statuses[429] > 0 and statuses[202] > 0
    assert (sale["held"], sale["remaining"]) == (statuses[202], 1000 - statuses[202])
    assert len(await placed_ids(gateway)) == statuses[202]


# -------------------------------------------------------------- hostile input


async def test_odd_bodies_never_give_a_500(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=5, per_user_limit=5)
    before = await redis_dump(redis_client)
    for raw in ODD_BODIES:
        for path, headers in [
            ("/v1/sales/sale-1/reservations", buyer("alice")),
            ("/v1/sales", ADMIN),
        ]:
            async with http.post(path, data=raw, headers=headers | JSON) as r:
                body = await expect_problem(r, r.status)
                assert 400 <= r.status < 500, (raw[:40], path, body)
    assert await redis_dump(redis_client) == before


ODD_SALES: list[Mapping[str, Any]] = [
    sale_body(starts_at="9999-12-31T23:59:59-05:00"),
    sale_body(starts_at="0001-01-01T00:00:00+05:00"),
    sale_body(starts_at="0001-01-01T00:00:00Z"),
    sale_body(ends_at="9999-12-31T23:59:59-05:00"),
    sale_body(starts_at=10**20),
    sale_body(starts_at=-(10**20)),
    sale_body(starts_at="not a date"),
    sale_body(hold_seconds=10**30),
    sale_body(stock=10**10),
    sale_body(per_user_limit=10**30),
]


@pytest.mark.parametrize("body", ODD_SALES, ids=lambda body: json.dumps(body)[16:70])
async def test_odd_sales_never_give_a_500(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis, body: dict[str, Any]
):
    async with http.post("/v1/sales", json=body, headers=ADMIN) as r:
        if r.status == 201:
            created = await r.json()
            assert (await sale_of(http))["stock"] == created["stock"]
        else:
            problem = await expect_problem(r, r.status)
            assert 400 <= r.status < 500, problem
            assert await redis_dump(redis_client) == {}


async def test_odd_paths_and_headers_never_give_a_500(
    http: aiohttp.ClientSession, gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway)
    before = await redis_dump(redis_client)
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/v1/sales/%C3%A9t%C3%A9", {}),
        ("GET", "/v1/sales/%F0%9F%9B%92", {}),
        ("GET", "/v1/sales/%FF%FE", {}),
        ("GET", "/v1/sales/a%2Fb", {}),
        ("POST", "/v1/sales/%C3%A9t%C3%A9/reservations", buyer("alice")),
        ("POST", "/v1/sales/%FF/reservations", buyer("alice")),
        ("POST", "/v1/sales/sale-1/reservations", {"Authorization": ""}),
        ("POST", "/v1/sales/sale-1/reservations", {"Authorization": "Bearer "}),
        ("POST", "/v1/sales/sale-1/reservations", {"Authorization": "Bearer \u00e9t\u00e9"}),
        ("POST", "/v1/sales/sale-1/reservations", {"Authorization": "Bearer " + "x" * 4000}),
        ("POST", "/v1/sales", {"Authorization": "Bearer \u00e9t\u00e9"}),
        ("GET", "/v1/reservations/%C2%B2-abc", {"Authorization": "Bearer \u00e9t\u00e9"}),
        ("GET", "/v1/reservations/%C2%B2-abc", ADMIN),
        ("GET", "/v1/reservations/1-%FF", buyer("alice")),
        ("PUT", "/v1/sales/sale-1/reservations", buyer("alice")),
    ]
    for method, path, headers in cases:
        async with http.request(method, path, headers=headers) as r:
            body = await expect_problem(r, r.status)
            assert 400 <= r.status < 500, (method, path, body)
    assert await redis_dump(redis_client) == before


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff\xfe", b"Bearer \xc3\x28", b"\xff Bearer", b"Bearer " + ADMIN_TOKEN.encode()],
)
async def test_non_utf8_authorization_header_is_a_4xx(
    server: TestServer, gateway: RedisGateway, authorization: bytes
):
    """Header bytes that are not UTF-8 reach the app as surrogate escapes; they are no token."""
    await open_sale(gateway)
    for method, path in [
        (b"POST", b"/v1/sales/sale-1/reservations"),
        (b"POST", b"/v1/sales"),
        (b"GET", b"/v1/reservations/0-abc"),
    ]:
        request = (
            method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 0\r\nAuthorization: " + authorization + b"\r\n\r\n"
        )
        status, head, body = await raw_http(server, request)
        assert 400 <= status < 500, (path, authorization, head, body)
        assert b"application/problem+json" in head, head


async def test_metrics_count_and_time_every_request_by_route_and_status(
    http: aiohttp.ClientSession, gateway: RedisGateway
):
    await open_sale(gateway, stock=1)
    for _ in range(7):
        async with http.get("/v1/sales/sale-1") as r:
            assert r.status == 200
    async with http.get("/v1/sales/nope") as r:
        assert r.status == 404
    async with http.get("/metrics") as r:
        text = await r.text()
    route = 'route="/v1/sales/{sale_id}"'
    assert f'flashsale_http_requests_total{{{route},status="200"}} 7.0' in text
    assert f'flashsale_http_requests_total{{{route},status="404"}} 1.0' in text
    assert f"flashsale_http_request_seconds_count{{{route}}} 8.0" in text
    assert f'flashsale_http_request_seconds_bucket{{le="+Inf",{route}}} 8.0' in text
    buckets = [
        float(n)
        for n in re.findall(
            r'^flashsale_http_request_seconds_bucket\{le="[^"]+",'
            + re.escape(route)
            + r"\} (\S+)$",
            text,
            re.M,
        )
    ]
    assert len(buckets) == 12 and buckets == sorted(buckets)
