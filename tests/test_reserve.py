"""The reserve script against a real Redis: every rule, and atomicity under contention."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.errors import LimitReached, SaleExists, SaleNotActive, SaleNotFound, SoldOut
from core.events import AnyEvent, ReservationPlaced, SaleCreated, parse_event
from core.gateway import RedisGateway
from core.keys import PartitionKeys
from tests.conftest import GatewayFactory
from tests.helpers import open_sale


async def log_events(client: aioredis.Redis, partitions: int) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    for p in range(partitions):
        for _, fields in await client.xrange(PartitionKeys(p, partitions).events) or []:
            assert fields is not None
            events.append(parse_event(fields[b"event"]))
    return events


async def test_create_sale_logs_sale_created(gateway: RedisGateway, redis_client: aioredis.Redis):
    view = await open_sale(gateway, stock=5, per_user_limit=2)
    assert (view.stock, view.remaining, view.status) == (5, 5, "active")
    events = await log_events(redis_client, gateway.partitions)
    assert len(events) == 1 and isinstance(events[0], SaleCreated)
    assert events[0].stock == 5 and events[0].per_user_limit == 2
    with pytest.raises(SaleExists):
        await open_sale(gateway, stock=7)


async def test_reserve_holds_stock_and_logs_the_placement(
    gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=3, per_user_limit=2, hold_seconds=60)
    placed = await gateway.reserve("sale-1", "alice", 2, None)
    assert not placed.replayed and placed.expires_at is not None
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and (sale.remaining, sale.held) == (1, 2)
    reservation = await gateway.get_reservation(placed.reservation_id)
    assert reservation is not None
    assert (reservation.user_id, reservation.qty, reservation.status) == ("alice", 2, "pending")
    events = await log_events(redis_client, gateway.partitions)
    placed_events = [e for e in events if isinstance(e, ReservationPlaced)]
    assert len(placed_events) == 1
    assert placed_events[0].reservation_id == placed.reservation_id
    assert placed_events[0].expires_at == reservation.expires_at


@pytest.mark.parametrize(
    ("setup", "call", "error"),
    [
        ({"stock": 1}, ("nope", "u", 1), SaleNotFound),
        ({"stock": 1, "starts_in": 3600}, ("sale-1", "u", 1), SaleNotActive),
        ({"stock": 1}, ("sale-1", "u", 2), LimitReached),
        ({"stock": 1, "per_user_limit": 5}, ("sale-1", "u", 2), SoldOut),
    ],
)
async def test_rejections_change_nothing(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    setup: dict[str, Any],
    call: tuple[str, str, int],
    error: type[Exception],
):
    await open_sale(gateway, **setup)
    before = await log_events(redis_client, gateway.partitions)
    with pytest.raises(error):
        await gateway.reserve(*call, None)
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and sale.remaining == setup["stock"] and sale.held == 0
    assert await log_events(redis_client, gateway.partitions) == before


async def test_limit_counts_every_reservation_of_the_user(gateway: RedisGateway):
    await open_sale(gateway, stock=10, per_user_limit=3)
    await gateway.reserve("sale-1", "bob", 2, None)
    with pytest.raises(LimitReached):
        await gateway.reserve("sale-1", "bob", 2, None)
    await gateway.reserve("sale-1", "bob", 1, None)
    with pytest.raises(LimitReached):
        await gateway.reserve("sale-1", "bob", 1, None)


async def test_same_idempotency_key_20_times_concurrently_is_one_reservation(
    gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=10, per_user_limit=5)
    results = await asyncio.gather(
        *(gateway.reserve("sale-1", "carol", 1, "key-1") for _ in range(20))
    )
    assert len({r.reservation_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and (sale.remaining, sale.held) == (9, 1)
    events = await log_events(redis_client, gateway.partitions)
    assert sum(isinstance(e, ReservationPlaced) for e in events) == 1


async def test_contention_never_oversells(gateway: RedisGateway, redis_client: aioredis.Redis):
    await open_sale(gateway, stock=50, per_user_limit=1)
    users = [f"u{i % 400}" for i in range(1200)]

    async def attempt(user: str) -> str:
        try:
            await gateway.reserve("sale-1", user, 1, None)
        except (SoldOut, LimitReached) as e:
            return e.code
        return "placed"

    outcomes = Counter(await asyncio.gather(*(attempt(u) for u in users)))
    assert outcomes["placed"] == 50
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and (sale.remaining, sale.held, sale.status) == (0, 50, "sold_out")
    placed = [
        e
        for e in await log_events(redis_client, gateway.partitions)
        if isinstance(e, ReservationPlaced)
    ]
    assert len(placed) == 50 and len({e.user_id for e in placed}) == 50


async def test_sold_out_hint_spares_redis_and_expires(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
):
    gateway = make_gateway(idempotency_ttl_seconds=3600, sold_out_hint_seconds=0.3)
    await open_sale(gateway, stock=1)
    first = await gateway.reserve("sale-1", "ann", 1, None)
    with pytest.raises(SoldOut):
        await gateway.reserve("sale-1", "bob", 1, None)
    await gateway.cancel(first.reservation_id, "ann")  # stock back through this process
    await gateway.reserve("sale-1", "bob", 1, None)
    with pytest.raises(SoldOut):
        await gateway.reserve("sale-1", "cat", 1, None)
    # Stock returned behind the hint's back (as another process's expiry would do):
    await redis_client.hincrby(gateway.keys_for_sale("sale-1").sale("sale-1"), "remaining", 1)
    with pytest.raises(SoldOut):  # answered from memory, without asking Redis
        await gateway.reserve("sale-1", "cat", 1, None)
    placed = await gateway.reserve("sale-1", "cat", 1, "key-1")  # a keyed request always asks
    assert not placed.replayed
    await redis_client.hincrby(gateway.keys_for_sale("sale-1").sale("sale-1"), "remaining", 1)
    await asyncio.sleep(0.35)
    await gateway.reserve("sale-1", "dan", 1, None)  # the hint has expired
