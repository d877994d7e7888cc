"""Times in events are exact to the millisecond, however far in the future (up to year 9999):
Lua's cjson would write 14 significant digits, rounding times of 10^14 ms and more."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis

from core.events import ReservationPlaced, SaleCreated, parse_event, to_ms
from core.gateway import RedisGateway
from core.models import NewSale
from projections.verify import verify
from tests.conftest import ProjectorFactory
from tests.http_helpers import log_events

START = datetime(9000, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
END = datetime(9999, 12, 30, 23, 59, 59, 999_000, tzinfo=UTC)


async def raw_events(client: aioredis.Redis, gateway: RedisGateway) -> list[dict[str, object]]:
    raw: list[dict[str, object]] = []
    for stream in gateway.stream_names():
        for _, fields in await client.xrange(stream) or []:
            assert fields is not None
            raw.append(json.loads(fields[b"event"]))
    return raw


async def test_a_far_future_window_is_logged_exactly(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    view = await gateway.create_sale(
        NewSale(sale_id="later", stock=3, starts_at=START, ends_at=END, hold_seconds=60)
    )
    assert (view.starts_at, view.ends_at, view.status) == (START, END, "scheduled")
    (created,) = await log_events(gateway)
    assert isinstance(created, SaleCreated)
    assert (created.starts_at, created.ends_at) == (START, END)
    (raw,) = await raw_events(redis_client, gateway)
    assert (raw["starts_at"], raw["ends_at"]) == (to_ms(START), to_ms(END))  # whole integers
    stored = await redis_client.hmget(gateway.keys_for_sale("later").sale("later"), "starts_at")
    assert stored == [str(to_ms(START)).encode()]
    projector = make_projector("t", block_ms=10)
    await projector.ensure_groups()
    await projector.handle(await projector.read_new(block_ms=10))
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT starts_at, ends_at FROM stock_view")
    assert (row["starts_at"], row["ends_at"]) == (START, END)
    assert (await verify(gateway, pool)).clean


async def test_a_sale_open_until_year_9999_takes_reservations_with_exact_events(
    gateway: RedisGateway,
):
    view = await gateway.create_sale(NewSale(sale_id="long", stock=3, ends_at=END))
    placed = await gateway.reserve("long", "ann", 1, None)
    created, reserved = await log_events(gateway)
    assert isinstance(created, SaleCreated) and isinstance(reserved, ReservationPlaced)
    assert created.ends_at == END == view.ends_at
    assert created.starts_at == view.starts_at
    assert reserved.expires_at == placed.expires_at


def test_stored_events_with_rounded_times_still_read():
    # As the scripts wrote them before: cjson's 14 significant digits, in exponent form.
    old = (
        '{"type":"SaleCreated","v":1,"event_id":"e1","sale_id":"s","occurred_at":1764460000123,'
        '"stock":1,"per_user_limit":1,"starts_at":2.5340221440012e+14,"hold_seconds":60}'
    )
    event = parse_event(old)
    assert isinstance(event, SaleCreated)
    assert to_ms(event.starts_at) == 253_402_214_400_120
    assert to_ms(event.occurred_at) == 1_764_460_000_123
