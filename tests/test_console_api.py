"""The admin API the operator console reads: every sale with live counters, attempts by
outcome and consumer health, and verify (run, and its last result seen by every worker)."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from api.web.state import VERIFY_LOCK
from core.keys import last_verify, partition_of
from core.settings import Settings
from tests.conftest import AppServerFactory
from tests.helpers import ADMIN_TOKEN, project_all
from tests.http_helpers import ADMIN, bearer, expect_problem, reserve, sale_body

ADMIN_ROUTES = [
    ("GET", "/v1/sales"),
    ("GET", "/v1/admin/overview"),
    ("POST", "/v1/admin/verify"),
    ("GET", "/v1/admin/verify"),
]


async def _json(http: aiohttp.ClientSession, method: str, path: str) -> Any:
    async with http.request(method, path, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _open(http: aiohttp.ClientSession, sale_id: str, stock: int = 10, **more: Any) -> None:
    body = sale_body(sale_id=sale_id, stock=stock, **more)
    async with http.post("/v1/sales", json=body, headers=ADMIN) as r:
        assert r.status == 201, await r.text()


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_the_console_routes_are_for_the_admin_only(
    http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, path) as r:
        await expect_problem(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.request(method, path, headers=bearer(ADMIN_TOKEN + "x")) as r:
        await expect_problem(r, 403, "forbidden")


async def test_sales_are_listed_with_live_counters(
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    settings: Settings,
) -> None:
    assert (await _json(http, "GET", "/v1/sales")) == {"sales": [], "truncated": False}
    await _open(http, "early", stock=5, starts_at="2026-01-01T09:00:00Z")
    await _open(http, "later", stock=7, per_user_limit=5)
    assert (await reserve(http, "ann", {"qty": 2}, sale_id="later")).status == 202
    await project_all(redis_client, pool, settings.partitions)
    listed = await _json(http, "GET", "/v1/sales")
    assert [s["sale_id"] for s in listed["sales"]] == ["later", "early"]  # latest start first
    later = listed["sales"][0]
    numbers = {k: later[k] for k in ("stock", "remaining", "held", "confirmed", "released")}
    assert numbers == {"stock": 7, "remaining": 5, "held": 2, "confirmed": 0, "released": 0}
    assert later["status"] == "active"
    # Counters are Redis's, now: a reservation not projected yet shows at once.
    assert (await reserve(http, "bob", {"qty": 1}, sale_id="later")).status == 202
    listed = await _json(http, "GET", "/v1/sales")
    assert listed["sales"][0]["remaining"] == 4 and listed["sales"][0]["held"] == 3


async def test_a_sale_the_projection_holds_but_redis_lost_is_left_out(
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    settings: Settings,
) -> None:
    await _open(http, "kept")
    await _open(http, "lost")
    await project_all(redis_client, pool, settings.partitions)
    keys = [k async for k in redis_client.scan_iter(match="*:sale:lost")]
    assert len(keys) == 1
    await redis_client.delete(*keys)
    listed = await _json(http, "GET", "/v1/sales")
    assert [s["sale_id"] for s in listed["sales"]] == ["kept"]


async def test_without_a_database_the_list_and_verify_are_unavailable(
    serve_app: AppServerFactory, settings: Settings
) -> None:
    http = await serve_app(settings.model_copy(update={"database_url": None}))
    for method, path in (("GET", "/v1/sales"), ("POST", "/v1/admin/verify")):
        async with http.request(method, path, headers=ADMIN) as r:
            body = await expect_problem(r, 503, "unavailable")
            assert "no database" in body["detail"]
            assert r.headers["Retry-After"] == "1"


async def test_the_overview_counts_attempts_by_outcome_and_shows_consumer_health(
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    settings: Settings,
) -> None:
    before = await _json(http, "GET", "/v1/admin/overview")
    assert before["consumers"]["readable"] is True
    assert before["consumers"]["groups"] == [] and before["consumers"]["dead_letters"] == 0
    await _open(http, "tiny", stock=1)
    assert (await reserve(http, "ann", sale_id="tiny")).status == 202
    assert (await reserve(http, "bob", sale_id="tiny")).status == 409
    assert (await reserve(http, "ann", sale_id="tiny")).status == 409
    await project_all(redis_client, pool, settings.partitions)
    after = await _json(http, "GET", "/v1/admin/overview")
    grew = {
        outcome: n - before["attempts"].get(outcome, 0) for outcome, n in after["attempts"].items()
    }
    assert {k: v for k, v in grew.items() if v} == {"placed": 1, "sold_out": 2}
    groups = after["consumers"]["groups"]
    assert len(groups) == settings.partitions and after["consumers"]["lag"] == 0
    # One more event, not projected: its partition's group owes it.
    await _open(http, "more")
    lagging = await _json(http, "GET", "/v1/admin/overview")
    owed = {g["partition"]: g["lag"] for g in lagging["consumers"]["groups"] if g["lag"]}
    assert owed == {partition_of("more", settings.partitions): 1}
    assert lagging["consumers"]["lag"] == 1


async def test_verify_runs_keeps_its_result_for_every_worker_and_finds_drift(
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    serve_app: AppServerFactory,
    redis_client: aioredis.Redis,
    settings: Settings,
) -> None:
    assert await _json(http, "GET", "/v1/admin/verify") == {"last": None}
    await _open(http, "checked")
    assert (await reserve(http, "ann", sale_id="checked")).status == 202
    await project_all(redis_client, pool, settings.partitions)
    clean = await _json(http, "POST", "/v1/admin/verify")
    assert clean["clean"] is True and clean["rows"] == []
    assert (clean["sales"], clean["events"], clean["differences"]) == (1, 2, 0)
    # Drift in Redis: found, named, and kept where another API process reads it.
    keys = [k async for k in redis_client.scan_iter(match="*:sale:checked")]
    await redis_client.hset(keys[0], "remaining", 3)
    drift = await _json(http, "POST", "/v1/admin/verify")
    assert drift["clean"] is False and drift["differences"] >= 1
    assert {"sale_id": "checked", "field": "remaining", "log": "9", "redis": "3"}.items() <= (
        drift["rows"][0].items()
    )
    other_worker = await serve_app()
    assert await _json(other_worker, "GET", "/v1/admin/verify") == {"last": drift}


async def test_a_second_verify_while_one_runs_is_refused(
    pool: asyncpg.Pool, server: TestServer, http: aiohttp.ClientSession
) -> None:
    async with server.app[VERIFY_LOCK], http.post("/v1/admin/verify", headers=ADMIN) as r:
        body = await expect_problem(r, 409, "verify_running")
        assert body["detail"] == "a verify is running already"
    async with http.post("/v1/admin/verify", headers=ADMIN) as r:
        assert r.status == 200


async def test_an_unreadable_kept_result_reads_as_none(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    await redis_client.set(last_verify(), '{"clean": "maybe"}')
    assert await _json(http, "GET", "/v1/admin/verify") == {"last": None}
