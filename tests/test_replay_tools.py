"""``flashsale replay verify | repair --redis | rebuild``: for each kind of drift, verify
names it in its three-way table, repair (Redis) or rebuild (PostgreSQL) puts it right, and
verify then exits 0; a rebuild under live traffic, and a log whose streams were trimmed,
end clean too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from core.errors import LimitReached
from core.gateway import RedisGateway, SaleRepair
from core.keys import PartitionKeys, partition_of
from core.settings import Settings
from projections.log import LogReader
from projections.rebuild import Rebuild
from projections.repair import repair_redis
from projections.tables.events import archive_missing
from projections.verify import read_log, verify
from tests.conftest import ProjectorFactory
from tests.helpers import open_sale, project_all
from tests.test_verify import cli_env, run_cli

USERS = [f"user-{i}" for i in range(6)]


@dataclass
class Sales:
    """Two projected sales in different partitions: sale -> reservation ids by user."""

    placed: dict[str, dict[str, str]]

    def rid(self, sale_id: str, user: str) -> str:
        return self.placed[sale_id][user]


async def replay(settings: Settings, *args: str) -> tuple[int, str, str]:
    return await run_cli(cli_env(settings), "replay", *args)


def keys(sale_id: str) -> PartitionKeys:
    return PartitionKeys(partition_of(sale_id, 4), 4)


def row_of(out: str, sale_id: str, field: str) -> list[str]:
    """The cells of the verify table row of ``sale_id`` and ``field``."""
    for line in out.splitlines():
        cells = line.split()
        if cells[:1] == [sale_id] and cells[2:3] == [field]:
            return cells
    raise AssertionError(f"no row for {sale_id} {field} in:\n{out}")


@pytest.fixture
async def sales(
    gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
) -> Sales:
    """sale-1 and sale-2, six buyers each: user-0 confirmed, user-1 cancelled, the rest
    pending, two of them with qty 2; everything projected."""
    assert partition_of("sale-1", 4) != partition_of("sale-2", 4)
    placed: dict[str, dict[str, str]] = {}
    for sale_id in ("sale-1", "sale-2"):
        await open_sale(gateway, sale_id, stock=20, per_user_limit=2)
        placed[sale_id] = {
            user: (await gateway.reserve(sale_id, user, 1 + i % 2, None)).reservation_id
            for i, user in enumerate(USERS)
        }
        await gateway.confirm(placed[sale_id]["user-0"], "user-0")
        await gateway.cancel(placed[sale_id]["user-1"], "user-1")
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)
    assert (await verify(gateway, pool)).clean
    return Sales(placed)


async def assert_verify_clean(settings: Settings) -> None:
    code, out, err = await replay(settings, "verify")
    assert code == 0, out + err
    assert out.startswith("clean: 2 sales"), out


# --- the three-way table --------------------------------------------------------------------


async def test_verify_table_shows_log_redis_and_postgres_side_by_side(
    sales: Sales, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
):
    # Each sale: 20 stock, 9 placed, user-0's 1 confirmed, user-1's 2 back: 13 remaining.
    await redis_client.hset(keys("sale-1").sale("sale-1"), "remaining", 11)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE stock_view SET remaining = 10 WHERE sale_id = 'sale-1'")
        await conn.execute("UPDATE stock_view SET held = 0 WHERE sale_id = 'sale-2'")
    await redis_client.hdel(keys("sale-2").holders("sale-2"), "user-3")

    code, out, err = await replay(settings, "verify")
    assert code == 1, out + err
    header = out.splitlines()[1].split()
    assert header == ["sale", "differs", "field", "log", "redis", "postgres"]
    assert row_of(out, "sale-1", "remaining") == [
        "sale-1", "redis+postgres", "remaining", "13", "11", "10"
    ]  # fmt: skip
    # "=": the store agrees with the log; "-": the store does not hold that field.
    assert row_of(out, "sale-2", "held") == ["sale-2", "postgres", "held", "6", "=", "0"]
    assert row_of(out, "sale-2", "holder:user-3") == [
        "sale-2", "redis", "holder:user-3", "2", "0", "-"
    ]  # fmt: skip

    code, out, _ = await replay(settings, "verify", "--sale", "sale-2", "--json")
    assert code == 1
    rows = json.loads(out)["rows"]
    assert {(r["sale_id"], r["field"], r["redis"], r["postgres"]) for r in rows} == {
        ("sale-2", "held", "=", "0"),
        ("sale-2", "holder:user-3", "0", "-"),
    }


# --- Redis drift: verify names it, repair --redis fixes it ----------------------------------

RedisDrift = Callable[[aioredis.Redis, Sales], Awaitable[str]]


async def _remaining_changed(client: aioredis.Redis, s: Sales) -> str:
    await client.hincrby(keys("sale-2").sale("sale-2"), "remaining", 3)
    return "remaining"


async def _holder_removed(client: aioredis.Redis, s: Sales) -> str:
    await client.hdel(keys("sale-2").holders("sale-2"), "user-3")
    return "holder:user-3"


async def _reservation_status_changed(client: aioredis.Redis, s: Sales) -> str:
    rid = s.rid("sale-2", "user-2")
    await client.hset(keys("sale-2").reservation(rid), "status", "confirmed")
    await client.zrem(keys("sale-2").deadlines, rid)
    return f"reservation:{rid}"


@pytest.mark.parametrize(
    "drift",
    [_remaining_changed, _holder_removed, _reservation_status_changed],
    ids=["remaining", "holder removed", "reservation status"],
)
async def test_redis_drift_is_named_then_repaired(
    sales: Sales,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    drift: RedisDrift,
):
    before = await gateway.get_sale("sale-2")
    field = await drift(redis_client, sales)

    code, out, err = await replay(settings, "verify")
    assert code == 1, out + err
    assert row_of(out, "sale-2", field)[1] == "redis"

    code, out, err = await replay(settings, "repair", "--redis", "--dry-run")
    assert code == 1, out + err
    assert out.startswith("DRY RUN: would repair 1 of 2 sales in Redis"), out
    assert row_of(out, "sale-2", field)[1] == "would-repair"
    assert not (await verify(gateway, pool)).clean  # the dry run wrote nothing

    code, out, err = await replay(settings, "repair", "--redis")
    assert code == 0, out + err
    assert out.startswith("repaired 1 of 2 sales in Redis"), out
    await assert_verify_clean(settings)
    assert await gateway.get_sale("sale-2") == before

    # What the buyers see is right again: user-3 is at the limit, user-2 can still pay.
    with pytest.raises(LimitReached):
        await gateway.reserve("sale-2", "user-3", 1, None)
    assert await gateway.confirm(sales.rid("sale-2", "user-2"), "user-2") is True
    again = await repair_redis(gateway, pool, "sale-2")
    assert again.clean
    assert again.to_table() == "repaired 0 of 1 sales in Redis: Redis already agrees with the log"


async def test_a_sale_wiped_from_redis_is_rebuilt_with_its_deadlines(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    k = keys("sale-1")
    before = await gateway.get_sale("sale-1")
    deadlines_before = await redis_client.zrange(k.deadlines, 0, -1, withscores=True)
    rids = list(sales.placed["sale-1"].values())
    await redis_client.delete(
        k.sale("sale-1"), k.holders("sale-1"), k.reservations("sale-1"), k.deadlines
    )
    await redis_client.delete(*(k.reservation(r) for r in rids))

    report = await verify(gateway, pool)
    assert [(d.sale_id, d.source, d.field) for d in report.differences] == [
        ("sale-1", "redis", "sale")
    ]
    repaired = await repair_redis(gateway, pool)
    assert repaired.clean and repaired.count("repaired") == 1
    assert (await verify(gateway, pool)).clean
    assert await gateway.get_sale("sale-1") == before
    assert await redis_client.zrange(k.deadlines, 0, -1, withscores=True) == deadlines_before
    view = await gateway.get_reservation(sales.rid("sale-1", "user-2"))
    assert view is not None and view.status == "pending"
    # Final reservations absent from Redis count as pruned (the archive holds them): the
    # repair leaves them out rather than bringing them back.
    for user in ("user-0", "user-1"):
        assert await gateway.get_reservation(sales.rid("sale-1", user)) is None


async def test_repair_is_fenced_on_the_log_position_it_folded(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    sale_key = keys("sale-2").sale("sale-2")
    await redis_client.hincrby(sale_key, "remaining", 5)
    snap = await gateway.snapshot_sale("sale-2")
    await gateway.reserve("sale-2", "newcomer", 1, None)  # the stream moves on

    stale = SaleRepair("sale-2", snap.last_id, {"remaining": 0})
    moved_to = await gateway.repair_sale(stale)
    assert moved_to is not None and moved_to != snap.last_id
    assert int(await redis_client.hget(sale_key, "remaining") or 0) > 0  # nothing written


async def test_repair_folds_again_when_a_reservation_slips_in(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    class Busy(RedisGateway):
        """A gateway whose first repair call races a real purchase on the same sale."""

        raced = False

        async def repair_sale(self, repair: SaleRepair, chunk: int = 500) -> str | None:
            if not self.raced:
                self.raced = True
                await gateway.reserve("sale-2", "racer", 1, None)
            return await super().repair_sale(repair, chunk)

    await redis_client.hincrby(keys("sale-2").sale("sale-2"), "remaining", 2)
    busy = Busy(redis_client, 4, 3600)
    report = await repair_redis(busy, pool, "sale-2")
    (outcome,) = report.outcomes
    assert (outcome.status, outcome.attempts) == ("repaired", 2)
    assert (await verify(gateway, pool)).differences == []  # racer's purchase kept, drift gone
    racer = await gateway.snapshot_sale("sale-2")
    assert racer.holders["racer"] == 1


async def test_repair_writes_a_large_repair_in_fenced_parts(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    """Parts of two reservations each; a purchase lands between two parts: the parts before
    it stay written (correct at the position they were fenced on), the rest is refused,
    and the repair folds again and writes what still differs."""

    class Parts(RedisGateway):
        calls = 0

        async def repair_sale(self, repair: SaleRepair, chunk: int = 500) -> str | None:
            return await super().repair_sale(repair, chunk=2)

        async def _repair_part(self, repair: SaleRepair) -> str | None:
            self.calls += 1
            if self.calls == 2:
                await gateway.reserve("sale-2", "racer", 1, None)
            return await super()._repair_part(repair)

    k = keys("sale-2")
    for user in ("user-2", "user-3", "user-4", "user-5"):
        await redis_client.hset(k.reservation(sales.rid("sale-2", user)), "status", "expired")
    parts = Parts(redis_client, 4, 3600)
    (outcome,) = (await repair_redis(parts, pool, "sale-2")).outcomes
    assert (outcome.status, outcome.attempts, parts.calls) == ("repaired", 2, 3)
    assert (await verify(gateway, pool)).differences == []
    assert (await gateway.snapshot_sale("sale-2")).holders["racer"] == 1


async def test_final_reservations_pruned_from_redis_are_not_drift(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    """Once archived, confirmed, cancelled and expired reservations leave Redis: verify
    does not call that drift, and repair does not bring them back."""
    k = keys("sale-1")
    pruned = [sales.rid("sale-1", "user-0"), sales.rid("sale-1", "user-1")]  # confirmed, cancelled
    for rid in pruned:
        await redis_client.delete(k.reservation(rid))
        await redis_client.srem(k.reservations("sale-1"), rid)

    assert (await verify(gateway, pool)).clean
    dry = await repair_redis(gateway, pool, dry_run=True)
    assert dry.clean and dry.count("clean") == 2

    await redis_client.hincrby(k.sale("sale-1"), "remaining", 1)  # a drift to repair
    (outcome,) = (await repair_redis(gateway, pool, "sale-1")).outcomes
    assert [d.field for d in outcome.differences] == ["remaining"]
    assert outcome.status == "repaired"
    for rid in pruned:
        assert await gateway.get_reservation(rid) is None
        assert not await redis_client.sismember(k.reservations("sale-1"), rid)
    assert (await verify(gateway, pool)).clean


async def test_a_pending_reservation_missing_from_redis_is_drift_and_restored(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    k = keys("sale-1")
    rid = sales.rid("sale-1", "user-2")
    deadline = await redis_client.zscore(k.deadlines, rid)
    await redis_client.delete(k.reservation(rid))
    await redis_client.srem(k.reservations("sale-1"), rid)
    await redis_client.zrem(k.deadlines, rid)

    report = await verify(gateway, pool)
    assert [(d.field, d.expected, d.actual) for d in report.differences] == [
        (f"reservation:{rid}", ("pending", 1, "user-2"), None)
    ]
    (outcome,) = (await repair_redis(gateway, pool, "sale-1")).outcomes
    assert outcome.status == "repaired"
    view = await gateway.get_reservation(rid)
    assert view is not None and (view.status, view.user_id) == ("pending", "user-2")
    assert await redis_client.zscore(k.deadlines, rid) == deadline
    assert (await verify(gateway, pool)).clean


async def test_repair_needs_the_redis_flag(settings: Settings):
    code, _, err = await replay(settings, "repair")
    assert code == 2 and "--redis" in err


# --- PostgreSQL drift: verify names it, rebuild fixes it ------------------------------------

PgDrift = Callable[[asyncpg.Connection, Sales, RedisGateway, aioredis.Redis], Awaitable[str]]


async def _order_deleted(conn: asyncpg.Connection, s: Sales, *_: object) -> str:
    await conn.execute("DELETE FROM orders WHERE reservation_id = $1", s.rid("sale-1", "user-4"))
    return f"order:{s.rid('sale-1', 'user-4')}"


async def _order_status_changed(conn: asyncpg.Connection, s: Sales, *_: object) -> str:
    rid = s.rid("sale-1", "user-0")
    await conn.execute("UPDATE orders SET status = 'expired' WHERE reservation_id = $1", rid)
    return f"order:{rid}"


async def _stock_view_changed(conn: asyncpg.Connection, s: Sales, *_: object) -> str:
    await conn.execute("UPDATE stock_view SET confirmed = confirmed + 4 WHERE sale_id = 'sale-1'")
    return "confirmed"


async def _archived_not_projected(
    conn: asyncpg.Connection, s: Sales, gateway: RedisGateway, client: aioredis.Redis
) -> str:
    placed = await gateway.reserve("sale-1", "late", 1, None)
    log = await read_log(gateway)
    entry = next(
        e
        for entries in log.values()
        for e in entries
        if getattr(e.event, "reservation_id", None) == placed.reservation_id
    )
    async with conn.transaction():  # archived, its effect never applied
        await archive_missing(conn, [entry])
    return f"order:{placed.reservation_id}"


@pytest.mark.parametrize(
    "drift",
    [_order_deleted, _order_status_changed, _stock_view_changed, _archived_not_projected],
    ids=["order deleted", "order status", "stock_view number", "archived not projected"],
)
async def test_postgres_drift_is_named_then_rebuilt(
    sales: Sales,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    drift: PgDrift,
):
    async with pool.acquire() as conn:
        field = await drift(conn, sales, gateway, redis_client)
    # the projector skips what is archived
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)

    code, out, err = await replay(settings, "verify")
    assert code == 1, out + err
    assert row_of(out, "sale-1", field)[1] == "postgres"
    assert "sale-2" not in out  # the other sale is not blamed

    code, out, err = await replay(settings, "rebuild")
    assert code == 0, out + err
    assert out.startswith("rebuilt orders and stock_view from "), out
    assert "folding the log" in err  # progress, on stderr
    await assert_verify_clean(settings)


async def test_an_acknowledged_event_missing_from_the_archive_is_archived_again(
    make_projector: ProjectorFactory,
    sales: Sales,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    placed = await gateway.reserve("sale-2", "lost", 1, None)
    buggy = make_projector("acks-too-early")
    delivered = await buggy.read_new(block_ms=10)
    await buggy.ack(delivered)  # acknowledged, never written to PostgreSQL
    (lost,) = [d for d in (await verify(gateway, pool)).differences]
    assert (lost.sale_id, lost.field[:6], lost.actual) == ("sale-2", "event:", "lost")

    report = await Rebuild(gateway, pool).run()
    assert report.rearchived == 1
    assert (await verify(gateway, pool)).clean
    async with pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM orders WHERE reservation_id = $1", placed.reservation_id
        )
    assert status == "pending"


async def test_an_event_in_flight_on_the_projector_is_counted_once(
    make_projector: ProjectorFactory,
    sales: Sales,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    await gateway.reserve("sale-1", "slow", 1, None)
    dead = make_projector("dead", claim_idle_ms=0)
    assert len(await dead.read_new(block_ms=10)) == 1  # delivered, not projected yet

    report = await Rebuild(gateway, pool).run()
    assert report.rearchived == 1  # folded into the new tables, so archived with them
    rescuer = make_projector("rescuer", claim_idle_ms=0)
    assert await rescuer.handle(await rescuer.claim_stale()) == 0  # not applied twice
    assert (await verify(gateway, pool)).clean
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT held FROM stock_view WHERE sale_id = 'sale-1'") == 7


async def test_rebuilt_tables_keep_their_grants(
    sales: Sales, gateway: RedisGateway, pool: asyncpg.Pool
):
    async with pool.acquire() as conn:
        try:
            await conn.execute(
                "DO $$ BEGIN CREATE ROLE flashsale_reports;"
                " EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        except asyncpg.InsufficientPrivilegeError:
            pytest.skip("this database user may not create roles")
        await conn.execute("GRANT SELECT ON orders, stock_view TO flashsale_reports")
    await Rebuild(gateway, pool).run()
    async with pool.acquire() as conn:
        for table in ("orders", "stock_view"):
            assert await conn.fetchval(
                "SELECT has_table_privilege('flashsale_reports', $1, 'SELECT')", table
            )


async def test_the_swap_waits_out_a_long_transaction(
    sales: Sales, gateway: RedisGateway, pool: asyncpg.Pool, settings: Settings
):
    reader = await asyncpg.connect(settings.database_url)
    try:
        long_running = reader.transaction()
        await long_running.start()
        await reader.fetch("SELECT * FROM orders")  # holds a lock on orders until it ends

        async def finish_later() -> None:
            await asyncio.sleep(0.5)
            await long_running.commit()

        ending = asyncio.create_task(finish_later())
        report = await Rebuild(gateway, pool, lock_timeout_ms=200, lock_attempts=10).run()
        await ending
    finally:
        await reader.close()
    assert report.orders == 12
    assert (await verify(gateway, pool)).clean


async def test_a_failed_rebuild_exits_2_loudly_and_leaves_the_live_tables(
    sales: Sales, pool: asyncpg.Pool, settings: Settings
):
    async with pool.acquire() as conn:
        await conn.execute("CREATE VIEW paid AS SELECT * FROM orders WHERE status = 'confirmed'")
        before = await conn.fetch("SELECT * FROM orders ORDER BY reservation_id")

    code, out, err = await replay(settings, "rebuild")
    assert code == 2, out + err
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: DependentObjectsStillExistError")
    async with pool.acquire() as conn:
        assert await conn.fetch("SELECT * FROM orders ORDER BY reservation_id") == before
        assert await conn.fetchval("SELECT to_regclass('orders_rebuild')") is None
    await assert_verify_clean(settings)


# --- a log whose streams were trimmed -------------------------------------------------------


async def test_trimmed_streams_lose_nothing(
    sales: Sales,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    async with pool.acquire() as conn:
        orders_before = await conn.fetch(
            "SELECT reservation_id, status, qty, placed_at, confirmed_at FROM orders ORDER BY 1"
        )
    for stream in gateway.stream_names():
        await redis_client.xtrim(stream, maxlen=1)  # the archive holds all but the newest
    assert (await verify(gateway, pool)).clean

    report = await Rebuild(gateway, pool, chunk=3).run()
    assert (report.events, report.orders) == (2 * (1 + 6 + 2), 12)
    async with pool.acquire() as conn:
        orders_after = await conn.fetch(
            "SELECT reservation_id, status, qty, placed_at, confirmed_at FROM orders ORDER BY 1"
        )
    assert orders_after == orders_before

    await redis_client.hincrby(keys("sale-1").sale("sale-1"), "held", 1)
    assert (await repair_redis(gateway, pool)).count("repaired") == 1
    await assert_verify_clean(settings)


# --- rebuild while reservations keep arriving -----------------------------------------------


async def test_rebuild_under_live_traffic_ends_with_verify_clean(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    names = ["live-1", "live-2", "live-3"]
    for name in names:
        await open_sale(gateway, name, stock=100_000, per_user_limit=1)
    projector = make_projector("live", batch=50, block_ms=5)
    await projector.ensure_groups()
    stop = asyncio.Event()
    placed: list[str] = []
    reached, target = asyncio.Event(), [3000]

    async def buy() -> None:
        n = 0
        while not stop.is_set():
            for name in names:
                placed.append((await gateway.reserve(name, f"u{n}", 1, None)).reservation_id)
            if n % 3 == 0:
                await gateway.confirm(placed[-1], None)
            if len(placed) >= target[0]:
                reached.set()
            n += 1
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(projector.run(stop)), asyncio.create_task(buy())]
    try:
        await reached.wait()
        report = await Rebuild(gateway, pool, chunk=500, catch_up_enough=20).run()
        target[0] = len(placed) + 300  # the projector goes on after the swap
        reached.clear()
        await reached.wait()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)

    assert report.caught_up > 0
    assert (await verify(gateway, pool)).differences == []
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders") == len(placed)
        indexes = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'orders'")
    assert {r["indexname"] for r in indexes} == {"orders_pkey", "orders_by_user"}


# --- how the rebuild reads and loads a large log --------------------------------------------


Read = list[tuple[int, str, str]]


async def _read_partitions(reader: LogReader, partitions: int) -> tuple[Read, Read]:
    """(partition, stream id, event id) of every entry read, and of those unarchived."""
    read: Read = []
    unarchived: Read = []
    for p in range(partitions):
        async for chunk in reader.chunks(p, check_archive=True):
            read += [(p, e.stream_id, e.event.event_id) for e in chunk.entries]
            unarchived += [(p, e.stream_id, e.event.event_id) for e in chunk.unarchived]
    return read, unarchived


@pytest.mark.parametrize("trim", [False, True])
async def test_reading_ahead_in_small_chunks_reads_the_same_log(
    sales: Sales,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    trim: bool,
):
    for n in range(3):  # in the streams, not archived yet
        await gateway.reserve("sale-1", f"late-{n}", 1, None)
    if trim:  # the archive holds what the streams no longer do
        for stream in gateway.stream_names():
            await redis_client.xtrim(stream, maxlen=4)
    whole, unarchived = await _read_partitions(LogReader(gateway, pool, 1000), 4)
    assert len(whole) == 2 * (1 + 6 + 2) + 3
    assert unarchived == [w for w in whole if w[0] == partition_of("sale-1", 4)][-3:]
    for chunk in (1, 2, 3):
        assert await _read_partitions(LogReader(gateway, pool, chunk), 4) == (whole, unarchived)


async def test_a_reader_left_early_leaves_no_read_running(
    sales: Sales, gateway: RedisGateway, pool: asyncpg.Pool
):
    before = asyncio.all_tasks()
    chunks = LogReader(gateway, pool, 1).chunks(partition_of("sale-1", 4), check_archive=True)
    first = await anext(chunks)
    assert len(first.entries) == 1
    await chunks.aclose()
    await asyncio.sleep(0)
    left = {t for t in asyncio.all_tasks() - before if not t.done()}
    # What may outlive it: asyncpg's own release of a connection whose query was cancelled
    # (the pool shields it from cancellation, and it waits for PostgreSQL to confirm the
    # cancel); it ends on its own, and no read of the reader is among what is left.
    releases = {t for t in left if "PoolConnectionHolder.release" in repr(t.get_coro())}
    assert left == releases
    if releases:
        await asyncio.wait(releases, timeout=10)
        assert all(t.done() for t in releases)


async def test_a_reader_left_early_has_stopped_its_reads_when_closed(
    sales: Sales, gateway: RedisGateway
):
    # Its next read is already sent when a chunk is handed out; closing waits for it.
    before = asyncio.all_tasks()
    chunks = LogReader(gateway, None, 1).chunks(partition_of("sale-1", 4))
    await anext(chunks)
    await chunks.aclose()
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()


async def test_a_sale_met_in_two_partitions_logs_is_loaded_once_with_all_its_events(
    sales: Sales, gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool
):
    """As after the number of partitions changed: sale-1's later events in another log."""
    stray = {
        "type": "ReservationPlaced",
        "v": 1,
        "event_id": "stray-event",
        "sale_id": "sale-1",
        "occurred_at": 1_764_460_000_000,
        "reservation_id": "stray-reservation",
        "user_id": "stray-user",
        "qty": 2,
        "expires_at": 1_764_460_600_000,
    }
    await redis_client.xadd(keys("sale-2").events, {"event": json.dumps(stray)})

    report = await Rebuild(gateway, pool).run()
    assert (report.events, report.orders) == (2 * (1 + 6 + 2) + 1, 13)
    async with pool.acquire() as conn:
        stock = await conn.fetch("SELECT sale_id, held FROM stock_view ORDER BY sale_id")
        orders = await conn.fetch("SELECT sale_id, count(*) FROM orders GROUP BY 1 ORDER BY 1")
        status = await conn.fetchval(
            "SELECT status FROM orders WHERE reservation_id = 'stray-reservation'"
        )
    # four pending buyers, two of them with 2 units, plus the stray 2
    assert [tuple(r) for r in stock] == [("sale-1", 6 + 2), ("sale-2", 6)]
    assert [tuple(r) for r in orders] == [("sale-1", 7), ("sale-2", 6)]
    assert status == "pending"


async def test_a_load_failing_midway_leaves_the_live_tables_and_a_rebuild_after_it_works(
    sales: Sales, gateway: RedisGateway, pool: asyncpg.Pool
):
    class Failing(Rebuild):
        copies = 0

        async def _copy(
            self, conn: asyncpg.Connection, table: str, columns: tuple[str, ...], rows: list[Any]
        ) -> None:
            Failing.copies += 1
            if Failing.copies == 3:  # the second partition's stock_view rows
                raise RuntimeError("disk full")
            await super()._copy(conn, table, columns, rows)

    async with pool.acquire() as conn:
        before = await conn.fetch("SELECT * FROM orders ORDER BY reservation_id")
    with pytest.raises(RuntimeError, match="disk full"):
        await Failing(gateway, pool).run()
    async with pool.acquire() as conn:
        assert await conn.fetch("SELECT * FROM orders ORDER BY reservation_id") == before
        assert await conn.fetchval("SELECT to_regclass('orders_rebuild')") is None
    report = await Rebuild(gateway, pool).run()
    assert report.orders == 12
    assert (await verify(gateway, pool)).clean
