"""The demo report's reads of ``orders``, owned by projections.tables.orders, on real rows."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from core.gateway import RedisGateway
from core.settings import Settings
from projections.tables import orders
from tests.helpers import open_sale, project_all


async def test_reads_of_a_sale_count_its_rows_statuses_units_and_multi_unit_buyers(
    gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
):
    await open_sale(gateway, "sale-1", stock=10, per_user_limit=2)
    await open_sale(gateway, "other", stock=10, per_user_limit=2)
    await gateway.reserve("sale-1", "alice", 2, None)  # pending, two units
    bob = (await gateway.reserve("sale-1", "bob", 1, None)).reservation_id
    await gateway.confirm(bob, None)
    carol = (await gateway.reserve("sale-1", "carol", 2, None)).reservation_id
    await gateway.cancel(carol, "carol")  # two units, but no longer held
    await gateway.reserve("other", "dave", 2, None)  # another sale: not counted
    await project_all(redis_client, pool, settings.partitions)

    async with pool.acquire() as conn:
        assert await orders.count_of_sale(conn, "sale-1") == 3
        assert await orders.status_totals(conn, "sale-1") == {
            "pending": (1, 2),
            "confirmed": (1, 1),
            "cancelled": (1, 2),
        }
        assert await orders.buyers_over_one_unit(conn, "sale-1") == 1
        assert await orders.count_of_sale(conn, "none") == 0
        assert await orders.status_totals(conn, "none") == {}
