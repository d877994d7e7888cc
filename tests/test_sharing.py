"""Several projectors share the partitions through leases, and every event still lands in
PostgreSQL exactly once: when both run, when one stops, and when one dies mid-batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import redis.asyncio as aioredis

from consumers.leases import PartitionLeases
from consumers.projector import Projector
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, dead_letter_stream
from core.settings import Settings
from projections.db import open_pool
from tests.conftest import GatewayFactory, ProjectorFactory
from tests.daemons import (
    cancelled_for_good,
    caught_up,
    eventually,
    group_pending,
    order_ids,
    sale_in_partition,
)
from tests.helpers import open_sale, place

PARTITIONS = 8
LEASE_MS = 600


@pytest.fixture
async def gateway8(make_gateway: GatewayFactory) -> RedisGateway:
    """A gateway over 8 partitions, with one open sale in each."""
    gateway = make_gateway(partitions=PARTITIONS)
    for p in range(PARTITIONS):
        await open_sale(gateway, sale_in_partition(p, PARTITIONS, "shared"), stock=10_000)
    return gateway


async def place_everywhere(gateway: RedisGateway, users: range) -> list[str]:
    """One reservation per user in every partition's sale; their ids."""
    placed: list[str] = []
    for p in range(PARTITIONS):
        sale = sale_in_partition(p, PARTITIONS, "shared")
        placed += await place(gateway, sale, [f"u{u}" for u in users])
    return placed


@contextlib.asynccontextmanager
async def running(projector: Projector) -> AsyncIterator[asyncio.Event]:
    """Run ``projector`` until the block exits (or the event it yields is set)."""
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until true; fail with ``what`` after 10 seconds."""

    async def check() -> bool:
        return condition()

    await eventually(check, 10, what)


def owned(*projectors: Projector) -> list[set[int]]:
    """The partitions each projector holds leases on."""
    return [set(p.leases.owned) if p.leases else set() for p in projectors]


async def exactly_once(client: aioredis.Redis, pool: asyncpg.Pool, placed: list[str]) -> None:
    """PostgreSQL holds every logged event once and an order per placement, nothing else."""
    await eventually(lambda: caught_up(client, pool, PARTITIONS), 30, "projectors lag behind")
    assert await order_ids(pool) == set(placed)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT sale_id, stock - remaining AS taken, held FROM stock_view ORDER BY sale_id"
        )
    per_sale = len(placed) // PARTITIONS
    assert [(r["taken"], r["held"]) for r in rows] == [(per_sale, per_sale)] * PARTITIONS
    assert await client.xlen(dead_letter_stream()) == 0


async def test_two_projectors_own_disjoint_partitions_and_project_each_event_once(
    make_projector: ProjectorFactory,
    gateway8: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    a = make_projector("a", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=100, batch=20)
    b = make_projector("b", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=100, batch=20)
    async with running(a), running(b):
        await until(lambda: [len(s) for s in owned(a, b)] == [4, 4], "no even split")
        first, second = owned(a, b)
        assert not first & second and first | second == set(range(PARTITIONS))
        placed = await place_everywhere(gateway8, range(30))
        await exactly_once(redis_client, pool, placed)
        # Each projected its own partitions' events, and only those: 8 sales + 240 placements.
        assert a.projected > 0 and b.projected > 0
        assert a.projected + b.projected == PARTITIONS + len(placed)
        assert owned(a, b) == [first, second]


async def test_a_projector_joining_gets_its_share_long_before_a_lease_period(
    make_projector: ProjectorFactory, gateway8: RedisGateway
):
    # Leases of a minute: refreshed every 20 s. The first consumer takes every partition;
    # the second gets its half as soon as it shows up, not 20 s later; and the first its
    # partitions back as soon as the second stops.
    a = make_projector("a", partitions=PARTITIONS, lease_ms=60_000, block_ms=100, batch=20)
    b = make_projector("b", partitions=PARTITIONS, lease_ms=60_000, block_ms=100, batch=20)
    async with running(a):
        await until(lambda: owned(a) == [set(range(PARTITIONS))], "a took nothing")
        async with running(b):
            await until(lambda: [len(s) for s in owned(a, b)] == [4, 4], "no even split")
            first, second = owned(a, b)
            assert not first & second
        await until(lambda: owned(a) == [set(range(PARTITIONS))], "a did not take them back")


async def test_a_stopped_projector_hands_its_partitions_to_the_other(
    make_projector: ProjectorFactory,
    gateway8: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    a = make_projector("a", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=100, batch=20)
    b = make_projector("b", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=100, batch=20)
    async with running(b):
        async with running(a):
            await until(lambda: [len(s) for s in owned(a, b)] == [4, 4], "no even split")
            placed = await place_everywhere(gateway8, range(10))
            await exactly_once(redis_client, pool, placed)
        # Stopped: gave its leases back and left the member set.
        assert owned(a) == [set()]
        await until(lambda: owned(b) == [set(range(PARTITIONS))], "b did not take over")
        placed += await place_everywhere(gateway8, range(10, 30))
        await exactly_once(redis_client, pool, placed)
        assert a.projected + b.projected == PARTITIONS + len(placed)


async def test_a_partition_taken_over_is_read_at_once_not_when_a_long_read_returns(
    make_projector: ProjectorFactory, gateway8: RedisGateway, pool: asyncpg.Pool
):
    """Reads that block for 30 s when idle: b, idle, blocks on its half of the partitions
    when a stops and gives the other half back. b takes them at once, and reads them at
    once too: a placement in one of them reaches PostgreSQL within seconds, not when b's
    read of its own half returns (up to 30 s later)."""
    a = make_projector("a", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=30_000, batch=20)
    b = make_projector("b", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=30_000, batch=20)
    async with running(b):
        async with running(a):
            await until(lambda: [len(s) for s in owned(a, b)] == [4, 4], "no even split")
            handed = min(owned(a)[0])
            await eventually(lambda: caught_up(gateway8.client, pool, PARTITIONS), 10, "lag")
        await until(lambda: owned(b) == [set(range(PARTITIONS))], "b did not take over")
        sale = sale_in_partition(handed, PARTITIONS, "shared")
        placed = await place(gateway8, sale, ["late"])
        await eventually(lambda: has_orders(pool, placed), 5, "b did not read the partition")


async def has_orders(pool: asyncpg.Pool, ids: list[str]) -> bool:
    return set(ids) <= await order_ids(pool)


async def test_a_projector_killed_mid_batch_leaves_the_survivor_exactly_the_events(
    make_projector: ProjectorFactory,
    gateway8: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    # Its own pool, since its connection dies with it mid-transaction.
    victim_pool = await open_pool(settings.database_url or "", 2)
    a = make_projector(
        "a", pool=victim_pool, partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=100, batch=5
    )
    b = make_projector(
        "b", partitions=PARTITIONS, lease_ms=LEASE_MS, block_ms=100, batch=5, claim_idle_ms=500
    )
    try:
        async with running(b):
            task = asyncio.create_task(a.run(asyncio.Event()))
            await until(lambda: [len(s) for s in owned(a, b)] == [4, 4], "no even split")
            buying = asyncio.create_task(place_everywhere(gateway8, range(60)))

            async def a_holds_a_batch() -> bool:
                return bool(await group_pending(redis_client, PARTITIONS, "a"))

            await eventually(a_holds_a_batch, 30, "never caught a holding a batch")
            await cancelled_for_good(task)  # dies as a killed process would: no release, no ack
            orphaned = await group_pending(redis_client, PARTITIONS, "a")
            placed = await buying
            await until(lambda: owned(b) == [set(range(PARTITIONS))], "b never took over")
            await exactly_once(redis_client, pool, placed)
            assert not await group_pending(redis_client, PARTITIONS, "a")
            assert orphaned == 0 or b.projected > 0
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM events") == PARTITIONS + len(
                    placed
                )
    finally:
        await victim_pool.close()


async def test_fair_shares_follow_the_live_members(redis_client: aioredis.Redis):
    leases = [
        PartitionLeases(redis_client, PARTITIONS, CONSUMER_GROUP, name, 60_000)
        for name in ("x", "y", "z")
    ]
    assert await leases[0].refresh() == set(range(PARTITIONS))
    for lease in leases[1:]:
        await lease.refresh()
    # x gives back what is beyond its share only on its next refresh; then the others fill up.
    for lease in leases:
        await lease.refresh()
    for lease in leases:
        await lease.refresh()
    sizes = sorted(len(lease.owned) for lease in leases)
    assert sizes == [2, 3, 3]
    assert set().union(*(lease.owned for lease in leases)) == set(range(PARTITIONS))
    # A member that leaves gives its partitions to the others.
    await leases[2].release_all()
    for lease in leases[:2] * 2:
        await lease.refresh()
    assert sorted(len(lease.owned) for lease in leases[:2]) == [4, 4]


async def test_a_consumer_restarted_under_its_name_takes_its_leases_back_at_once(
    redis_client: aioredis.Redis,
):
    first = PartitionLeases(redis_client, PARTITIONS, CONSUMER_GROUP, "stable", 60_000)
    assert await first.refresh() == set(range(PARTITIONS))
    # Killed: nothing given back. The same name, restarted, does not wait a minute for them;
    # another name gets nothing while they are held.
    other = PartitionLeases(redis_client, PARTITIONS, CONSUMER_GROUP, "other", 60_000)
    assert await other.refresh() == set()
    again = PartitionLeases(redis_client, PARTITIONS, CONSUMER_GROUP, "stable", 60_000)
    assert len(await again.refresh()) == PARTITIONS // 2  # its share, now two are alive
