"""Recovery after a consumer dies, and restarts that must not count as failures.

With the default settings (``FLASHSALE_CLAIM_IDLE_MS`` 5 s), real ``flashsale consume``
processes: a consumer killed (kill -9) while it holds an uncommitted batch loses nothing,
and every reservation accepted before the kill is in PostgreSQL within 10 s of it, whether
it is restarted under its name (it resumes its own pending entries at once) or another
consumer takes over. A consumer that is only slow (stuck in a PostgreSQL transaction for
longer than the claim idle) keeps its entries: no one reclaims them, no delivery is
counted. A batch released on SIGTERM during an outage does not count as a delivery, so
restarts never park healthy events.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, PartitionKeys, dead_letter_stream
from core.settings import Settings
from tests.conftest import ProjectorFactory
from tests.daemons import (
    consumer_name,
    env_for,
    eventually,
    group_pending,
    logged,
    order_ids,
    running,
    sale_in_partition,
    start,
    start_consumers,
    stop_all,
    terminate,
    wait_exit,
    wait_started,
)
from tests.helpers import open_sale, text


def default_env(settings: Settings, **extra: str) -> dict[str, str]:
    """A consume daemon's environment with the default claim idle (not the tests' fast one)."""
    env = env_for(settings.redis_url or "", settings.database_url or "", 4, **extra)
    del env["FLASHSALE_CLAIM_IDLE_MS"]
    return env


async def open_sales(gateway: RedisGateway, prefix: str) -> list[str]:
    sales = [sale_in_partition(p, prefix=prefix) for p in range(4)]
    for sale in sales:
        await open_sale(gateway, sale, stock=100_000)
    return sales


@asynccontextmanager
async def buying(gateway: RedisGateway, sales: list[str]) -> AsyncIterator[list[str]]:
    """Reservations placed all along (about 200/s) until the block exits; yields their ids."""
    placed: list[str] = []
    stop = asyncio.Event()

    async def buy() -> None:
        n = 0
        while not stop.is_set():
            for sale in sales:
                placed.append((await gateway.reserve(sale, f"u{n}", 1, None)).reservation_id)
            n += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(buy())
    try:
        yield placed
    finally:
        stop.set()
        await task


@asynccontextmanager
async def orders_locked(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Hold a lock every projection needs: batches stall inside their transaction."""
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        yield


async def pending_rows(client: aioredis.Redis) -> list[tuple[str, int]]:
    """(consumer, times delivered) of every entry pending in the projector group."""
    rows: list[tuple[str, int]] = []
    for p in range(4):
        found = await client.xpending_range(
            PartitionKeys(p, 4).events, CONSUMER_GROUP, "-", "+", 10_000
        )
        rows += [(text(r["consumer"]), int(r["times_delivered"])) for r in found]
    return rows


async def kill_holding_a_batch(
    client: aioredis.Redis, pool: asyncpg.Pool, victim: subprocess.Popen[bytes], name: str
) -> tuple[float, int]:
    """Kill ``victim`` (kill -9) while its batch is stalled before commit; the time of the
    kill and how many entries it held."""
    async with orders_locked(pool):
        holds = functools.partial(_holds, client, name)
        await eventually(holds, 15, "the victim never held a batch")
        await asyncio.sleep(0.3)
        victim.kill()
        killed_at = time.monotonic()
        held = await group_pending(client, 4, name)
    return killed_at, held


async def _holds(client: aioredis.Redis, name: str) -> bool:
    return await group_pending(client, 4, name) > 0


async def projected_within(
    pool: asyncpg.Pool, rids: set[str], within: float, alive: Callable[[], None]
) -> float:
    """Seconds until PostgreSQL holds every one of ``rids`` (fails after ``within``)."""
    started = time.monotonic()

    async def there() -> bool:
        return rids <= await order_ids(pool)

    await eventually(there, within, f"not projected within {within} s", alive)
    return time.monotonic() - started


# --- kill -9, restarted under its name --------------------------------------------------------


async def test_consumer_killed_and_restarted_under_its_name_resumes_at_once(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sales = await open_sales(gateway, "resume")
    env = default_env(settings, FLASHSALE_CONSUMER_NAME="projector-1")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start(["consume"], env, log_a)
    b = None
    try:
        await wait_started(a, log_a)
        async with buying(gateway, sales) as placed:
            await eventually(lambda: _some_projected(pool), 15, "projection never started")
            killed_at, held = await kill_holding_a_batch(redis_client, pool, a, "projector-1")
            assert held > 0
            before_kill = set(placed)
            assert await wait_exit(a, 10) == -signal.SIGKILL
            b = start(["consume"], env, log_b)
            alive = running((b, log_b))
            await projected_within(pool, before_kill, 10 - (time.monotonic() - killed_at), alive)
            took = time.monotonic() - killed_at
            await asyncio.sleep(0.5)
        print(f"every reservation accepted before the kill projected {took:.1f} s after it")
        assert sum(r["count"] for r in logged(log_b, "entries_resumed")) >= held
        assert not logged(log_b, "entries_reclaimed")  # its own entries: no idle wait

        async def caught_up() -> bool:
            return await order_ids(pool) == set(placed) and not await group_pending(redis_client, 4)

        await eventually(caught_up, 15, "did not catch up", alive)
        assert await redis_client.xlen(dead_letter_stream()) == 0
        assert await terminate(b) == 0
    finally:
        stop_all(a, b)


async def _some_projected(pool: asyncpg.Pool) -> bool:
    return len(await order_ids(pool)) > 20


# --- kill -9, another consumer takes over -----------------------------------------------------


async def test_another_consumer_takes_over_a_killed_one_within_ten_seconds(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sales = await open_sales(gateway, "takeover")
    env = default_env(settings)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a, b = await start_consumers(env, log_a, log_b)
    try:
        alive = running((b, log_b))
        async with buying(gateway, sales) as placed:
            await eventually(lambda: _some_projected(pool), 15, "projection never started")
            killed_at, held = await kill_holding_a_batch(redis_client, pool, a, consumer_name(a))
            assert held > 0
            before_kill = set(placed)
            await projected_within(pool, before_kill, 10 - (time.monotonic() - killed_at), alive)
            took = time.monotonic() - killed_at
        print(f"every reservation accepted before the kill projected {took:.1f} s after it")
        assert sum(r["count"] for r in logged(log_b, "entries_reclaimed")) >= held

        async def caught_up() -> bool:
            return await order_ids(pool) == set(placed) and not await group_pending(redis_client, 4)

        await eventually(caught_up, 15, "did not catch up", alive)
        assert await redis_client.xlen(dead_letter_stream()) == 0
        assert await terminate(b) == 0
    finally:
        stop_all(a, b)


# --- slow, not dead -----------------------------------------------------------------------------


async def test_a_consumer_stuck_in_a_slow_transaction_keeps_its_entries(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sales = await open_sales(gateway, "slow")
    env = default_env(settings)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a, b = await start_consumers(env, log_a, log_b)
    try:
        alive = running((a, log_a), (b, log_b))
        placed = [
            (await gateway.reserve(sale, f"u{i}", 1, None)).reservation_id
            for i in range(10)
            for sale in sales
        ]
        async with orders_locked(pool):
            placed += [
                (await gateway.reserve(sale, f"v{i}", 1, None)).reservation_id
                for i in range(10)
                for sale in sales
            ]
            await eventually(lambda: _holds_any(redis_client), 10, "nothing delivered", alive)
            await asyncio.sleep(1)  # every consumer that will read something has read it
            held = await pending_rows(redis_client)
            # Stuck well past the claim idle (5 s): the heartbeat keeps the entries theirs.
            await asyncio.sleep(7.5)
            alive()
            assert await pending_rows(redis_client) == held
            assert {count for _, count in held} == {1}

        async def caught_up() -> bool:
            return await order_ids(pool) == set(placed) and not await group_pending(redis_client, 4)

        await eventually(caught_up, 15, "did not catch up once unblocked", alive)
        for log_path in (log_a, log_b):
            assert not logged(log_path, "entries_reclaimed"), log_path.read_text()[-2000:]
        assert await redis_client.xlen(dead_letter_stream()) == 0
        assert await terminate(a) == 0 and await terminate(b) == 0
    finally:
        stop_all(a, b)


async def _holds_any(client: aioredis.Redis) -> bool:
    return await group_pending(client, 4) > 0


# --- SIGTERM during an outage, five times -----------------------------------------------------


@pytest.mark.parametrize("stable_name", [False, True], ids=["new-names", "stable-name"])
async def test_restarts_during_an_outage_never_park_healthy_events(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    stable_name: bool,
):
    await open_sale(gateway, "sale-1", stock=10)
    rids = [(await gateway.reserve("sale-1", f"u{i}", 1, None)).reservation_id for i in range(3)]
    # Nothing listens there: PostgreSQL is down for every one of these consumers.
    down = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:9/x", min_size=0)
    try:
        for restart in range(6):
            name = "projector" if stable_name else f"projector-{restart}"
            p = make_projector(name, pool=down, claim_idle_ms=300)
            stop = asyncio.Event()
            task = asyncio.create_task(p.run(stop))
            taken = functools.partial(_taken_or_parked, redis_client, name)
            await eventually(taken, 10, "batch not taken")
            await asyncio.sleep(0.2)
            stop.set()  # SIGTERM: the batch cannot go through, so it is released
            await asyncio.wait_for(task, 10)
            assert await redis_client.xlen(dead_letter_stream()) == 0, f"parked at {restart}"
            assert len(await pending_rows(redis_client)) == 4  # SaleCreated + 3 placements
    finally:
        await down.close()
    # PostgreSQL is back: the next consumer projects all of it, and parks nothing.
    heir = make_projector("heir", claim_idle_ms=300)
    stop = asyncio.Event()
    task = asyncio.create_task(heir.run(stop))
    await eventually(lambda: _all_in(pool, rids), 10, "not projected once PostgreSQL was back")
    stop.set()
    await asyncio.wait_for(task, 10)
    assert heir.dead_lettered == 0 and await redis_client.xlen(dead_letter_stream()) == 0
    assert await group_pending(redis_client, 4) == 0
    assert heir.projected == 4  # every event was still there to project, none given up on


async def _taken_or_parked(client: aioredis.Redis, name: str) -> bool:
    parked = await client.xlen(dead_letter_stream())
    return parked > 0 or await group_pending(client, 4, name) == 4


async def _all_in(pool: asyncpg.Pool, rids: list[str]) -> bool:
    return await order_ids(pool) == set(rids)
