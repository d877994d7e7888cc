"""The admin API the operator console reads: every sale with live counters, attempts by
outcome and consumer health, and verify (run, and its last result seen by every worker)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from api.web.admin import VERIFY_LOCK_MS
from core.gateway import RedisGateway
from core.keys import last_verify, partition_of, verify_lock
from core.settings import Settings
from tests.conftest import AppServerFactory
from tests.daemons import eventually
from tests.helpers import ADMIN_TOKEN, project_all
from tests.http_helpers import (
    ADMIN,
    bearer,
    expect_problem,
    expect_verify_refused,
    reserve,
    sale_body,
    verify_held_up,
)

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


async def until_lock_is(client: aioredis.Redis, held: bool) -> None:
    """Wait until the verify lock is held (or free)."""

    async def now() -> bool:
        return bool(await client.exists(verify_lock())) == held

    await eventually(now, 10, f"the verify lock is not {'held' if held else 'free'}")


async def test_a_verify_running_in_one_api_process_refuses_a_second_in_any(
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    serve_app: AppServerFactory,
    redis_client: aioredis.Redis,
    settings: Settings,
) -> None:
    await _open(http, "checked")
    await project_all(redis_client, pool, settings.partitions)
    other_process = await serve_app()  # an app of its own: what another worker or host runs
    async with verify_held_up(pool):
        first = asyncio.create_task(_json(http, "POST", "/v1/admin/verify"))
        try:
            await until_lock_is(redis_client, held=True)
            await expect_verify_refused(other_process)
            await expect_verify_refused(http)
            assert 0 < await redis_client.pttl(verify_lock()) <= VERIFY_LOCK_MS
            assert not first.done()
        except BaseException:
            first.cancel()
            raise
    assert (await first)["clean"] is True
    assert not await redis_client.exists(verify_lock())  # given back by the run
    assert (await _json(other_process, "POST", "/v1/admin/verify"))["clean"] is True


async def test_a_failed_verify_gives_the_lock_back(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    await pool.execute("DROP TABLE events CASCADE")
    for _ in range(2):  # verify cannot read the archive, and the second is not refused
        async with http.post("/v1/admin/verify", headers=ADMIN) as r:
            body = await expect_problem(r, 503, "unavailable")
            assert "verify could not read PostgreSQL" in body["detail"]
    assert not await redis_client.exists(verify_lock())


async def test_a_verify_lock_left_by_a_dead_holder_expires(
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    gateway: RedisGateway,
    settings: Settings,
) -> None:
    await project_all(redis_client, pool, settings.partitions)  # the tables, for verify
    dead = await gateway.take_verify_lock(300)  # taken and never given back
    assert dead is not None
    await expect_verify_refused(http)
    await until_lock_is(redis_client, held=False)
    assert (await _json(http, "POST", "/v1/admin/verify"))["clean"] is True


async def test_a_late_release_leaves_the_next_runs_lock_alone(
    gateway: RedisGateway, redis_client: aioredis.Redis
) -> None:
    late = await gateway.take_verify_lock(100)  # a run that outlives its time to live
    assert late is not None
    assert await gateway.take_verify_lock(60_000) is None
    await until_lock_is(redis_client, held=False)
    now = await gateway.take_verify_lock(60_000)
    assert now is not None and now != late
    assert await gateway.release_verify_lock(late) is False
    assert await redis_client.get(verify_lock()) == now.encode()
    assert await gateway.release_verify_lock(now) is True
    assert not await redis_client.exists(verify_lock())
    assert await gateway.release_verify_lock(now) is False  # safe to repeat


async def test_an_unreadable_kept_result_reads_as_none(
    http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    await redis_client.set(last_verify(), '{"clean": "maybe"}')
    assert await _json(http, "GET", "/v1/admin/verify") == {"last": None}
