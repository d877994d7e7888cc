"""Every state-changing script run twice with the same arguments, as a client does when the
first reply was lost: the second run answers the first outcome and changes nothing more.

``RunTwice`` makes each call of one of the gateway's scripts run twice against the real
Redis with the same keys and arguments (through the gateway's script runner, which
coalesces calls into pipelines); the tests compare both replies, the events and the
counters.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.events import ReservationExpired
from core.gateway import RedisGateway
from tests.helpers import open_sale
from tests.http_helpers import log_events


class RunTwice:
    """Stands in for the gateway's script runner: each call of ``script`` runs twice with
    the same keys and arguments and answers the second reply; ``replies`` keeps both.
    Calls of other scripts run once."""

    def __init__(self, run: Any, script: Any) -> None:
        self.run = run
        self.script = script
        self.replies: list[tuple[Any, Any]] = []

    async def __call__(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        if script is not self.script:
            return await self.run(script, keys, args)
        first = await self.run(script, keys, args)
        second = await self.run(script, keys, args)
        self.replies.append((first, second))
        return second


def twice(monkeypatch: pytest.MonkeyPatch, gateway: RedisGateway, name: str) -> RunTwice:
    wrapper = RunTwice(gateway.scripts.run, getattr(gateway, name))
    monkeypatch.setattr(gateway.scripts, "run", wrapper)
    return wrapper


async def event_types(gateway: RedisGateway) -> Counter[str]:
    return Counter(type(e).__name__ for e in await log_events(gateway))


def assert_same(wrapper: RunTwice) -> None:
    assert wrapper.replies, "the script was not called"
    for first, second in wrapper.replies:
        assert second == first


async def counters(gateway: RedisGateway, sale_id: str = "sale-1") -> tuple[int, ...]:
    view = await gateway.get_sale(sale_id)
    assert view is not None
    return (view.stock, view.remaining, view.held, view.confirmed, view.released)


async def test_create_sale_twice_creates_it_once(
    gateway: RedisGateway, monkeypatch: pytest.MonkeyPatch
):
    wrapper = twice(monkeypatch, gateway, "_create_sale")
    view = await open_sale(gateway, stock=5)  # the second run does not say sale_exists
    assert view.stock == 5
    assert_same(wrapper)
    assert await event_types(gateway) == Counter(SaleCreated=1)


@pytest.mark.parametrize("key", [None, "key-1"])
@pytest.mark.parametrize("limit", [1, 3])
async def test_reserve_twice_places_once_and_answers_the_placement(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    key: str | None,
    limit: int,
):
    await open_sale(gateway, stock=5, per_user_limit=limit)
    wrapper = twice(monkeypatch, gateway, "_reserve")
    placed = await gateway.reserve("sale-1", "ann", 1, key)
    assert not placed.replayed and placed.expires_at is not None  # not limit_reached
    assert_same(wrapper)
    assert await counters(gateway) == (5, 4, 1, 0, 0)
    assert await event_types(gateway) == Counter(SaleCreated=1, ReservationPlaced=1)
    keys = gateway.keys_for_sale("sale-1")
    assert await redis_client.hget(keys.holders("sale-1"), "ann") == b"1"
    mine = await gateway.reservations_of("sale-1", "ann")
    assert mine is not None and [v.reservation_id for v in mine] == [placed.reservation_id]
    if key is not None:  # a later request with the key is a replay of this placement
        again = await gateway.reserve("sale-1", "ann", 1, key)
        assert again.replayed and again.reservation_id == placed.reservation_id
        assert again.view is not None and again.view.status == "pending"


@pytest.mark.parametrize("key", [None, "restock-1"])
async def test_adjust_stock_twice_adjusts_once_and_answers_changed(
    gateway: RedisGateway, monkeypatch: pytest.MonkeyPatch, key: str | None
):
    await open_sale(gateway, stock=5)
    wrapper = twice(monkeypatch, gateway, "_adjust_stock")
    assert await gateway.adjust_stock("sale-1", 3, key) is True
    assert_same(wrapper)
    assert await counters(gateway) == (8, 8, 0, 0, 0)
    assert await event_types(gateway) == Counter(SaleCreated=1, StockAdjusted=1)
    # Another call (a new operation) is still told what it did.
    assert await gateway.adjust_stock("sale-1", 3, key) is (key is None)


async def test_close_sale_twice_closes_once_and_answers_changed(
    gateway: RedisGateway, monkeypatch: pytest.MonkeyPatch
):
    await open_sale(gateway, stock=5)
    wrapper = twice(monkeypatch, gateway, "_close_sale")
    assert await gateway.close_sale("sale-1") is True
    assert_same(wrapper)
    assert await event_types(gateway) == Counter(SaleCreated=1, SaleClosed=1)
    assert await gateway.close_sale("sale-1") is False  # another call finds it closed


@pytest.mark.parametrize("action", ["confirm", "cancel"])
async def test_confirm_or_cancel_twice_changes_once_and_answers_changed(
    gateway: RedisGateway, monkeypatch: pytest.MonkeyPatch, action: str
):
    await open_sale(gateway, stock=5, per_user_limit=2)
    placed = await gateway.reserve("sale-1", "ann", 2, None)
    wrapper = twice(monkeypatch, gateway, f"_{action}")
    call = gateway.confirm if action == "confirm" else gateway.cancel
    assert await call(placed.reservation_id, "ann") is True
    assert_same(wrapper)
    expected = (5, 3, 0, 2, 0) if action == "confirm" else (5, 5, 0, 0, 2)
    assert await counters(gateway) == expected
    name = "ReservationConfirmed" if action == "confirm" else "ReservationCancelled"
    assert await event_types(gateway) == Counter(SaleCreated=1, ReservationPlaced=1, **{name: 1})
    assert await call(placed.reservation_id, "ann") is False  # another call: already done


async def test_expire_twice_expires_once_with_event_ids_of_the_reservations(
    gateway: RedisGateway, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
):
    await open_sale(gateway, stock=5, hold_seconds=0)
    rids = [(await gateway.reserve("sale-1", u, 1, None)).reservation_id for u in ("a", "b")]
    wrapper = twice(monkeypatch, gateway, "_expire")
    partition = gateway.keys_for_sale("sale-1").partition
    assert await gateway.expire_due(partition) == (2, 0)
    assert_same(wrapper)  # the repeated run answers the first run's count
    assert await counters(gateway) == (5, 5, 0, 0, 2)
    expired = [e for e in await log_events(gateway) if isinstance(e, ReservationExpired)]
    assert sorted(e.event_id for e in expired) == sorted(f"{rid}:expired" for rid in rids)
    assert await gateway.expire_due(partition) == (0, 0)
    assert not await redis_client.zcard(gateway.keys_for_partition(partition).deadlines)
