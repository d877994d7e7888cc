"""Reservation lifecycle against a real Redis: confirm, cancel, expiry, stock, closing."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis.asyncio as aioredis

from consumers.expiry import ExpiryWorker
from core.errors import (
    NotEnoughUnsoldStock,
    ReservationClosed,
    ReservationNotFound,
    ReservationPastDeadline,
    SaleNotActive,
    SoldOut,
)
from core.gateway import RedisGateway
from projections.verify import read_log
from tests.helpers import open_sale


async def counters(gateway: RedisGateway, sale_id: str = "sale-1") -> tuple[int, int, int, int]:
    sale = await gateway.get_sale(sale_id)
    assert sale is not None
    assert sale.remaining + sale.held + sale.confirmed == sale.stock
    return sale.remaining, sale.held, sale.confirmed, sale.released


async def event_types(gateway: RedisGateway) -> Counter[str]:
    log = await read_log(gateway)
    return Counter(e.event.type for entries in log.values() for e in entries)


async def test_confirm_sells_the_held_stock_once(gateway: RedisGateway):
    await open_sale(gateway, stock=3)
    placed = await gateway.reserve("sale-1", "ann", 1, None)
    assert await gateway.confirm(placed.reservation_id, "ann") is True
    assert await gateway.confirm(placed.reservation_id, "ann") is False  # repeat: no change
    assert await counters(gateway) == (2, 0, 1, 0)
    view = await gateway.get_reservation(placed.reservation_id)
    assert view is not None and view.status == "confirmed"
    assert (await event_types(gateway))["ReservationConfirmed"] == 1
    with pytest.raises(ReservationClosed):
        await gateway.cancel(placed.reservation_id, "ann")


async def test_only_the_buyer_or_an_admin_can_confirm(gateway: RedisGateway):
    await open_sale(gateway, stock=3)
    placed = await gateway.reserve("sale-1", "ann", 1, None)
    with pytest.raises(ReservationNotFound):
        await gateway.confirm(placed.reservation_id, "bob")
    with pytest.raises(ReservationNotFound):
        await gateway.cancel(placed.reservation_id, "bob")
    assert await gateway.confirm(placed.reservation_id, None) is True


async def test_cancel_returns_stock_and_quota(gateway: RedisGateway):
    await open_sale(gateway, stock=1)
    placed = await gateway.reserve("sale-1", "ann", 1, None)
    with pytest.raises(SoldOut):
        await gateway.reserve("sale-1", "bob", 1, None)
    assert await gateway.cancel(placed.reservation_id, "ann") is True
    assert await gateway.cancel(placed.reservation_id, "ann") is False
    assert await counters(gateway) == (1, 0, 0, 1)
    with pytest.raises(ReservationClosed):
        await gateway.confirm(placed.reservation_id, "ann")
    again = await gateway.reserve("sale-1", "ann", 1, None)  # quota came back too
    assert again.reservation_id != placed.reservation_id


async def test_expiry_returns_stock_and_late_confirm_loses(gateway: RedisGateway):
    await open_sale(gateway, stock=2, hold_seconds=0)
    placed = await gateway.reserve("sale-1", "ann", 1, None)
    with pytest.raises(ReservationPastDeadline):  # past the deadline: refused before any sweep
        await gateway.confirm(placed.reservation_id, "ann")
    assert await counters(gateway) == (1, 1, 0, 0)
    assert await ExpiryWorker(gateway).sweep() == 1
    assert await ExpiryWorker(gateway).sweep() == 0
    assert await counters(gateway) == (2, 0, 0, 1)
    with pytest.raises(ReservationPastDeadline):
        await gateway.confirm(placed.reservation_id, "ann")
    with pytest.raises(ReservationPastDeadline):
        await gateway.cancel(placed.reservation_id, "ann")
    view = await gateway.get_reservation(placed.reservation_id)
    assert view is not None and view.status == "expired"
    assert (await event_types(gateway))["ReservationExpired"] == 1


async def test_confirm_and_expiry_racing_never_both_win(gateway: RedisGateway):
    await open_sale(gateway, stock=300, per_user_limit=1, hold_seconds=1)
    placed = [await gateway.reserve("sale-1", f"u{i}", 1, None) for i in range(300)]
    await asyncio.sleep(0.9)  # deadlines are now around "now"

    async def confirm(rid: str, user: str) -> str:
        try:
            await gateway.confirm(rid, user)
        except ReservationPastDeadline:
            return "expired"
        return "confirmed"

    workers = [ExpiryWorker(gateway, batch=7) for _ in range(3)]
    results = await asyncio.gather(
        *(confirm(p.reservation_id, f"u{i}") for i, p in enumerate(placed)),
        *(w.sweep() for w in workers for _ in range(20)),
    )
    await asyncio.sleep(0.2)
    await workers[0].sweep()
    confirmed = sum(r == "confirmed" for r in results[:300])
    statuses = Counter(
        v.status
        for v in [await gateway.get_reservation(p.reservation_id) for p in placed]
        if v is not None
    )
    assert statuses["pending"] == 0
    assert statuses["confirmed"] == confirmed
    assert statuses["expired"] == 300 - confirmed
    assert await counters(gateway) == (300 - confirmed, 0, confirmed, 300 - confirmed)
    types = await event_types(gateway)
    assert types["ReservationConfirmed"] == confirmed
    assert types["ReservationExpired"] == 300 - confirmed


async def test_two_expiry_workers_never_expire_twice(gateway: RedisGateway):
    await open_sale(gateway, stock=500, per_user_limit=1, hold_seconds=0)
    for i in range(500):
        await gateway.reserve("sale-1", f"u{i}", 1, None)
    a, b = ExpiryWorker(gateway, batch=10), ExpiryWorker(gateway, batch=10)
    counts = await asyncio.gather(a.sweep(), b.sweep(), a.sweep(), b.sweep())
    assert sum(counts) == 500
    assert await counters(gateway) == (500, 0, 0, 500)
    assert (await event_types(gateway))["ReservationExpired"] == 500


async def test_expiry_survives_a_worker_restart(
    gateway: RedisGateway, redis_client: aioredis.Redis
):
    await open_sale(gateway, stock=50, per_user_limit=1, hold_seconds=1)
    for i in range(50):
        await gateway.reserve("sale-1", f"u{i}", 1, None)
    stop = asyncio.Event()
    first = asyncio.create_task(ExpiryWorker(gateway, interval=0.05).run(stop))
    await asyncio.sleep(0.1)
    first.cancel()  # the worker dies before any deadline passes
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(1.1)
    second = ExpiryWorker(gateway, interval=0.05)
    task = asyncio.create_task(second.run(stop))
    await asyncio.sleep(0.5)
    stop.set()
    await task
    assert second.expired == 50
    assert await counters(gateway) == (50, 0, 0, 50)


async def test_restock_lets_waiting_buyers_succeed(gateway: RedisGateway):
    await open_sale(gateway, stock=1)
    await gateway.reserve("sale-1", "ann", 1, None)
    with pytest.raises(SoldOut):
        await gateway.reserve("sale-1", "bob", 1, None)
    assert await gateway.adjust_stock("sale-1", 2, "restock-1") is True
    assert await gateway.adjust_stock("sale-1", 2, "restock-1") is False  # same key: no-op
    await gateway.reserve("sale-1", "bob", 1, None)
    await gateway.reserve("sale-1", "cat", 1, None)
    assert await counters(gateway) == (0, 3, 0, 0)
    assert (await gateway.get_sale("sale-1")).stock == 3  # type: ignore[union-attr]


async def test_withdrawing_more_than_remains_is_refused(gateway: RedisGateway):
    await open_sale(gateway, stock=5)
    await gateway.reserve("sale-1", "ann", 1, None)
    with pytest.raises(NotEnoughUnsoldStock):
        await gateway.adjust_stock("sale-1", -5, None)
    assert await gateway.adjust_stock("sale-1", -4, None) is True
    assert await counters(gateway) == (0, 1, 0, 0)
    types = await event_types(gateway)
    assert types["StockAdjusted"] == 1


async def test_closing_a_sale_stops_reservations_but_keeps_holds(gateway: RedisGateway):
    await open_sale(gateway, stock=5)
    placed = await gateway.reserve("sale-1", "ann", 1, None)
    assert await gateway.close_sale("sale-1") is True
    assert await gateway.close_sale("sale-1") is False
    with pytest.raises(SaleNotActive):
        await gateway.reserve("sale-1", "bob", 1, None)
    assert await gateway.confirm(placed.reservation_id, "ann") is True
    sale = await gateway.get_sale("sale-1")
    assert sale is not None and sale.status == "ended"
    assert (await event_types(gateway))["SaleClosed"] == 1
