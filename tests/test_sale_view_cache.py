"""GET /v1/sales/{id} from the per-process cache: at most FLASHSALE_SALE_VIEW_CACHE_MS old,
an unknown sale not kept, admin writes through the process seen at once."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from api.web.reservations import Placement, placement_json
from api.web.sale_views import SaleViewCache
from core.errors import InfrastructureError
from core.gateway import RedisGateway
from core.settings import Settings
from tests.helpers import open_sale
from tests.http_helpers import ADMIN, serve


async def test_a_purchase_shows_in_the_view_within_the_cache_age(
    settings: Settings, gateway: RedisGateway, redis_client: aioredis.Redis
):
    age_ms = 300
    cached = settings.model_copy(update={"sale_view_cache_ms": age_ms})
    await open_sale(gateway, stock=10)
    async with serve(cached, redis_client) as http:
        first_read = time.monotonic()
        async with http.get("/v1/sales/sale-1") as r:
            assert (await r.json())["remaining"] == 10
        # Placed by another process: this one learns of it by reading Redis again.
        await gateway.reserve("sale-1", "ann", 1, None)
        async with http.get("/v1/sales/sale-1") as r:
            remaining = (await r.json())["remaining"]
        if time.monotonic() - first_read < age_ms / 1000:
            assert remaining == 10  # the kept view, read before the purchase
        await asyncio.sleep(age_ms / 1000)
        async with http.get("/v1/sales/sale-1") as r:
            assert (await r.json())["remaining"] == 9


async def test_an_unknown_sale_is_not_kept_and_a_new_one_shows_at_once(
    settings: Settings, gateway: RedisGateway, redis_client: aioredis.Redis
):
    cached = settings.model_copy(update={"sale_view_cache_ms": 60_000})
    async with serve(cached, redis_client) as http:
        async with http.get("/v1/sales/sale-1") as r:
            assert r.status == 404
        await open_sale(gateway, stock=10)  # by another process
        async with http.get("/v1/sales/sale-1") as r:
            assert r.status == 200 and (await r.json())["stock"] == 10


async def test_admin_writes_through_the_process_drop_the_kept_view(
    settings: Settings, gateway: RedisGateway, redis_client: aioredis.Redis
):
    cached = settings.model_copy(update={"sale_view_cache_ms": 60_000})
    await open_sale(gateway, stock=10)
    async with serve(cached, redis_client) as http:
        async with http.get("/v1/sales/sale-1") as r:
            assert (await r.json())["stock"] == 10
        async with http.post("/v1/sales/sale-1/stock", json={"delta": 5}, headers=ADMIN) as r:
            assert r.status == 200
        async with http.get("/v1/sales/sale-1") as r:
            assert (await r.json())["stock"] == 15
        async with http.post("/v1/sales/sale-1/close", headers=ADMIN) as r:
            assert r.status == 200
        async with http.get("/v1/sales/sale-1") as r:
            assert (await r.json())["status"] == "ended"


async def test_the_view_is_read_each_time_when_the_cache_is_off(
    settings: Settings, gateway: RedisGateway, redis_client: aioredis.Redis
):
    off = settings.model_copy(update={"sale_view_cache_ms": 0})
    await open_sale(gateway, stock=10)
    async with serve(off, redis_client) as http:
        for remaining, user in ((9, "ann"), (8, "bob")):
            await gateway.reserve("sale-1", user, 1, None)
            async with http.get("/v1/sales/sale-1") as r:
                assert (await r.json())["remaining"] == remaining


def test_the_202_body_written_directly_is_what_the_model_serializes():
    for deadline in (
        datetime(2026, 11, 30, 1, 52, 0, 123000, tzinfo=UTC),
        datetime(2026, 11, 30, 1, 52, 0, tzinfo=UTC),
        datetime(2027, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
    ):
        model = Placement(reservation_id="3-0af9", status="pending", expires_at=deadline)
        assert placement_json("3-0af9", deadline) == model.model_dump_json()


async def test_callers_waiting_for_one_read_each_get_its_answer_or_its_error():
    cache = SaleViewCache(ttl=60.0)
    reads = 0
    release = asyncio.Event()

    async def read() -> str | None:
        nonlocal reads
        reads += 1
        await release.wait()
        return '{"sale_id": "sale-1"}'

    callers = [asyncio.create_task(cache.get("sale-1", read)) for _ in range(5)]
    await asyncio.sleep(0)
    # One caller goes away while the read is under way: the others still get the view.
    callers[0].cancel()
    release.set()
    answers = await asyncio.gather(*callers[1:])
    assert answers == ['{"sale_id": "sale-1"}'] * 4 and reads == 1
    assert callers[0].cancelled()
    assert await cache.get("sale-1", read) == '{"sale_id": "sale-1"}' and reads == 1  # kept

    async def failing() -> str | None:
        await asyncio.sleep(0)
        raise InfrastructureError("redis is down")

    waiting = [asyncio.create_task(cache.get("sale-2", failing)) for _ in range(3)]
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(r) for r in results] == [InfrastructureError] * 3
    assert await cache.get("sale-2", read) == '{"sale_id": "sale-1"}'  # a failure is not kept
