"""Helpers shared by the tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from consumers.projector import Projector
from core.gateway import RedisGateway
from core.gateway.clients import RedisClient
from core.models import NewSale, SaleView

ADMIN_TOKEN = "test-admin-token"
JWT_SECRET = "test-jwt-secret-0123456789abcdef"

# A poison row: PostgreSQL refuses every order of the buyer "mallory".
REFUSE_MALLORY = """
CREATE FUNCTION refuse_mallory() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.user_id = 'mallory' THEN
        RAISE EXCEPTION 'orders of mallory are refused';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_mallory BEFORE INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION refuse_mallory();
"""


async def open_sale(
    gateway: RedisGateway,
    sale_id: str = "sale-1",
    stock: int = 10,
    per_user_limit: int = 1,
    hold_seconds: int = 600,
    starts_in: float | None = None,
) -> SaleView:
    """Create a sale that is active now (or starts ``starts_in`` seconds from now)."""
    starts_at = datetime.now(UTC) + timedelta(seconds=starts_in) if starts_in else None
    return await gateway.create_sale(
        NewSale(
            sale_id=sale_id,
            stock=stock,
            per_user_limit=per_user_limit,
            hold_seconds=hold_seconds,
            starts_at=starts_at,
        )
    )


async def pg_rows(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the projection wrote, without the bookkeeping timestamps."""
    queries = {
        "orders": "SELECT reservation_id, sale_id, user_id, qty, status, placed_at, expires_at,"
        " confirmed_at, cancelled_at, expired_at FROM orders ORDER BY reservation_id",
        "stock_view": "SELECT sale_id, stock, remaining, held, confirmed, released,"
        " per_user_limit, hold_seconds, starts_at, ends_at, closed FROM stock_view"
        " ORDER BY sale_id",
        "events": "SELECT event_id, partition, stream_id, stream_ms, stream_seq, sale_id, type,"
        " occurred_at, payload FROM events ORDER BY event_id",
        "checkpoints": "SELECT consumer_group, partition, stream_id FROM checkpoints"
        " ORDER BY consumer_group, partition",
    }
    async with pool.acquire() as conn:
        return {name: [tuple(r) for r in await conn.fetch(q)] for name, q in queries.items()}


async def project_all(
    client: aioredis.Redis,
    pool: asyncpg.Pool,
    partitions: int,
    consumer: str = "test-projector",
    batch: int = 500,
) -> None:
    """Run a projector until every entry of every stream is archived and acknowledged."""
    projector = Projector(client, pool, partitions, consumer=consumer, batch=batch)
    await projector.ensure_groups()
    while deliveries := await projector.read_new(block_ms=10):
        await projector.handle(deliveries)


async def every_key(client: RedisClient) -> list[bytes | str]:
    """Every key of the database: on a cluster, of every primary (KEYS asks one node)."""
    if isinstance(client, RedisCluster):
        return await client.keys("*", target_nodes=RedisCluster.PRIMARIES)
    return await client.keys("*")


async def command_calls(client: RedisClient, command: str) -> int:
    """How many times ``command`` ran (INFO commandstats): on a cluster, on every primary."""
    if isinstance(client, RedisCluster):
        per_node = await client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
        stats = list(per_node.values())
    else:
        stats = [await client.info("commandstats")]
    return sum(int(s.get(f"cmdstat_{command.lower()}", {}).get("calls", 0)) for s in stats)


def text(value: object) -> str:
    """A Redis reply (bytes, or str from a decoding client) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def place(gateway: RedisGateway, sale_id: str, users: list[str]) -> list[str]:
    """One unit reserved for each of ``users`` in turn; their reservation ids."""
    return [(await gateway.reserve(sale_id, u, 1, None)).reservation_id for u in users]


def sale_counts(
    stock: int, remaining: int, held: int, confirmed: int, released: int
) -> dict[str, int]:
    """A sale's counters by name."""
    return {
        "stock": stock,
        "remaining": remaining,
        "held": held,
        "confirmed": confirmed,
        "released": released,
    }
