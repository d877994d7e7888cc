"""The dead-letter rules against real Redis and PostgreSQL, and what an operator sees.

An entry that keeps failing is parked with its error and delivery count and the consumer
moves on; ``flashsale dlq list`` shows it, ``flashsale dlq retry`` projects it once the
cause is gone; ``flashsale status`` and ``/metrics`` show lag, pending age and the
dead-letter count. Outages are never the entry's fault and never park anything.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from api.web.app import create_app
from consumers.deadletter import list_parked, retry_parked
from consumers.faults import is_transient
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, dead_letter_stream
from core.settings import Settings
from projections.verify import verify
from tests.conftest import ProjectorFactory
from tests.daemons import (
    cli,
    cli_json,
    env_for,
    eventually,
    group_pending,
    logged,
    order_ids,
    running,
    sale_in_partition,
    start,
    stop_all,
    terminate,
    wait_started,
)
from tests.helpers import REFUSE_MALLORY, open_sale, place, text


async def test_entry_delivered_more_than_max_deliveries_is_parked_with_its_count(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "sale-1", stock=10)
    rids = await place(gateway, "sale-1", ["u0", "u1", "u2"])
    stream = gateway.keys_for_sale("sale-1").events

    first = make_projector("crashy-0", claim_idle_ms=0)
    await first.ensure_groups()
    taken = await first.read_new(block_ms=10)  # SaleCreated + 3 placements, delivery 1 each
    assert len(taken) == 4
    hot = taken[2]
    # One entry keeps taking its consumers down: each claims it and dies before the XACK.
    for i in range(1, 4):
        await redis_client.xclaim(stream, CONSUMER_GROUP, f"crashy-{i}", 0, [hot.stream_id])

    heir = make_projector("heir", claim_idle_ms=0, max_deliveries=3)
    claimed = await heir.claim_stale()
    counts = {d.stream_id: d.deliveries for d in claimed}
    assert counts == {d.stream_id: 5 if d is hot else 2 for d in taken}
    await heir.handle(claimed)

    assert heir.dead_lettered == 1
    assert await group_pending(redis_client, 4) == 0
    parked = await list_parked(redis_client)
    assert len(parked) == 1
    assert (parked[0].stream, parked[0].stream_id) == (stream, hot.stream_id)
    assert parked[0].deliveries == 5
    assert parked[0].group == CONSUMER_GROUP and parked[0].consumer == "heir"
    assert "delivered 5 times and never acknowledged" in parked[0].error
    assert parked[0].fields == hot.fields
    assert await order_ids(pool) == {rids[0], rids[2]}  # the other placements went through

    outcomes = await retry_parked(redis_client, pool, 4)
    assert [(o.parked_id, o.result) for o in outcomes] == [(parked[0].id, "projected")]
    assert await list_parked(redis_client) == []
    assert await order_ids(pool) == set(rids)
    assert (await verify(gateway, pool)).clean

    # A second copy of the same parked entry (parking is at-least-once) is recognised.
    await redis_client.xadd(
        dead_letter_stream(),
        {
            "stream": stream,
            "stream_id": hot.stream_id,
            "group": CONSUMER_GROUP,
            **{f"field:{k}": v for k, v in hot.fields.items()},
        },
    )
    assert [o.result for o in await retry_parked(redis_client, pool, 4)] == ["already_projected"]
    assert await redis_client.xlen(dead_letter_stream()) == 0
    assert await order_ids(pool) == set(rids)


async def test_consume_parks_failing_and_malformed_entries_keeps_going_and_dlq_redrives(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    async with pool.acquire() as conn:
        await conn.execute(REFUSE_MALLORY)
    await open_sale(gateway, "sale-1", stock=100)
    stream = gateway.keys_for_sale("sale-1").events
    env = env_for(
        settings.redis_url or "",
        settings.database_url or "",
        FLASHSALE_MAX_DELIVERIES="3",
        FLASHSALE_CLAIM_IDLE_MS="300",
    )
    log_path = tmp_path / "consume.log"
    proc = start(["consume"], env, log_path)
    try:
        await wait_started(proc, log_path)
        alive = running((proc, log_path))
        early = await place(gateway, "sale-1", [f"early-{i}" for i in range(10)])
        mallory = (await gateway.reserve("sale-1", "mallory", 1, None)).reservation_id
        junk_id = text(await redis_client.xadd(stream, {"event": "{not json"}))
        late = await place(gateway, "sale-1", [f"late-{i}" for i in range(10)])
        good = set(early + late)

        async def good_ones_projected() -> bool:
            return await order_ids(pool) == good

        await eventually(good_ones_projected, 15, "consumer stuck behind a poison entry", alive)

        async def both_parked() -> bool:
            length: int = await redis_client.xlen(dead_letter_stream())
            return length == 2 and not await group_pending(redis_client, 4)

        await eventually(both_parked, 15, "failing entries not parked", alive)

        parked = {p["stream_id"]: p for p in await cli_json(env, "dlq", "list")}
        mallory_id = next(sid for sid in parked if sid != junk_id)
        junk, refused = parked[junk_id], parked[mallory_id]
        assert junk["deliveries"] == 1  # unparseable: parked on first sight
        assert junk["fields"] == {"event": "{not json"} and junk["stream"] == stream
        assert refused["deliveries"] == 3  # tried max_deliveries times, then parked
        assert "RaiseError: orders of mallory are refused" in refused["error"]
        assert mallory in refused["fields"]["event"]
        failures = [r for r in logged(log_path, "event_failed") if r["stream_id"] == mallory_id]
        assert [r["deliveries"] for r in failures] == [1, 2]
        rc, table = await cli(env, "dlq", "list")
        assert rc == 0 and "2 parked" in table and "orders of mallory" in table

        status = await cli_json(env, "status")
        assert status["dead_letters"] == 2 and status["lag"] == 0
        rc, out = await cli(env, "replay", "verify")
        assert rc == 1 and "lost" in out, out  # PostgreSQL lacks a parked event: drift

        # The cause is still there: retrying changes nothing and says so.
        rc, out = await cli(env, "dlq", "retry", refused["id"])
        assert rc == 1 and "failed" in out and "orders of mallory" in out
        assert len(await list_parked(redis_client)) == 2

        async with pool.acquire() as conn:
            await conn.execute("DROP TRIGGER refuse_mallory ON orders")
        rc, out = await cli(env, "dlq", "retry", "--all")
        assert rc == 1, out  # the unparseable one can never go through
        assert "1 of 2 re-driven" in out
        assert await order_ids(pool) == good | {mallory}
        assert [p.stream_id for p in await list_parked(redis_client)] == [junk_id]

        rc, out = await cli(env, "dlq", "drop", junk["id"])
        assert rc == 0 and "dropped 1 of 1" in out
        assert await cli_json(env, "dlq", "list") == []

        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)


async def test_status_and_metrics_show_lag_pending_age_and_dead_letters(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    busy, quiet = sale_in_partition(1, prefix="busy"), sale_in_partition(2, prefix="quiet")
    await open_sale(gateway, busy, stock=50)
    await place(gateway, busy, [f"u{i}" for i in range(10)])  # 11 entries in partition 1
    await redis_client.xadd(gateway.keys_for_sale(quiet).events, {"event": "junk"})

    slow = make_projector("slow", batch=4)
    await slow.ensure_groups()
    held = await slow.read_new(block_ms=10)  # 4 of partition 1 and the junk: not handled
    assert len(held) == 5
    await slow.ack([d for d in held if d.partition == 2])
    parker = make_projector("parker", batch=4)
    await parker.handle(await parker.read_new(block_ms=10))  # 4 more of partition 1
    await redis_client.xadd(
        dead_letter_stream(), {"stream": "x", "stream_id": "1-1", "error": "e", "deliveries": "1"}
    )
    await asyncio.sleep(0.3)

    env = env_for(settings.redis_url or "", settings.database_url or "")
    status = await cli_json(env, "status")
    rows = {(g["group"], g["partition"]): g for g in status["groups"]}
    assert set(rows) == {(CONSUMER_GROUP, p) for p in range(4)}
    busy_row = rows[(CONSUMER_GROUP, 1)]
    assert (busy_row["lag"], busy_row["undelivered"], busy_row["pending"]) == (7, 3, 4)
    assert busy_row["consumers"] == 2
    assert 0.3 <= busy_row["oldest_pending_seconds"] < 30
    assert rows[(CONSUMER_GROUP, 2)]["lag"] == 0
    assert rows[(CONSUMER_GROUP, 2)]["oldest_pending_seconds"] is None
    assert status["streams"] == {"0": 0, "1": 11, "2": 1, "3": 0}
    assert (status["lag"], status["pending"], status["dead_letters"]) == (7, 4, 1)
    rc, table = await cli(env, "status")
    assert rc == 0
    assert re.search(r"^projector\s+1\s+11\s+7\s+3\s+4\s+\d+\.\ds$", table, re.M), table
    assert "total lag: 7  dead letters: 1" in table

    async with TestClient(TestServer(create_app(settings, redis_client))) as http:
        body = await (await http.get("/metrics")).text()
        assert 'flashsale_consumer_lag{group="projector",partition="1"} 7.0' in body
        assert 'flashsale_consumer_pending{group="projector",partition="1"} 4.0' in body
        assert 'flashsale_consumer_lag{group="projector",partition="2"} 0.0' in body
        assert 'flashsale_stream_entries{partition="1"} 11.0' in body
        assert "flashsale_dead_letter_entries 1.0" in body
        assert "flashsale_consumer_health_up 1.0" in body
        age = re.search(
            r'flashsale_consumer_oldest_pending_seconds\{group="projector",partition="1"\} (\S+)',
            body,
        )
        assert age is not None and float(age.group(1)) >= 0.3

        await slow.handle([d for d in held if d.partition == 1])  # the slow one catches up
        body = await (await http.get("/metrics")).text()
        assert 'flashsale_consumer_lag{group="projector",partition="1"} 3.0' in body
        assert 'flashsale_consumer_pending{group="projector",partition="1"} 0.0' in body


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError("postgres is down"), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), True),
        (asyncpg.exceptions.AdminShutdownError("terminating"), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), True),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), True),
        (asyncpg.exceptions.TooManyConnectionsError("full"), True),
        (asyncpg.exceptions.UndefinedTableError("not migrated"), True),
        (asyncpg.InterfaceError("pool is closing"), True),
        (asyncpg.exceptions.RaiseError("a trigger said no"), False),
        (asyncpg.exceptions.NumericValueOutOfRangeError("qty"), False),
        (asyncpg.exceptions.CheckViolationError("qty > 0"), False),
        (KeyError("a bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_outages_are_transient_and_an_entrys_own_failures_are_not(
    error: BaseException, transient: bool
):
    assert is_transient(error) is transient


async def test_a_batch_held_through_an_outage_is_neither_stolen_nor_parked(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    await open_sale(gateway, "sale-1", stock=10)
    rids = await place(gateway, "sale-1", ["u0", "u1", "u2"])
    stream = gateway.keys_for_sale("sale-1").events
    # A's PostgreSQL refuses connections (nothing listens there); B's is fine.
    unreachable = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:9/x", min_size=0)
    a = make_projector("a", pool=unreachable, claim_idle_ms=300)
    b = make_projector("b", claim_idle_ms=300, max_deliveries=2)
    await a.ensure_groups()
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    running_a = asyncio.create_task(a.run(stop_a))
    await asyncio.sleep(0.3)
    running_b = asyncio.create_task(b.run(stop_b))
    # B claims idle entries every 0.15 s, but A keeps the batch it cannot project claimed.
    await asyncio.sleep(2.5)
    rows = await redis_client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)
    assert [(text(r["consumer"]), r["times_delivered"]) for r in rows] == [("a", 1)] * 4
    assert await order_ids(pool) == set() and b.dead_lettered == 0

    stop_b.set()
    await asyncio.wait_for(running_b, 5)
    stop_a.set()  # A stops: it cannot finish the batch, so it hands it back ...
    await asyncio.wait_for(running_a, 5)
    rows = await redis_client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)
    assert all(int(r["time_since_delivered"]) >= 300 for r in rows)  # ... marked idle at once
    # ... and its delivery is taken back: nothing failed, so B's must not count a second.
    assert [r["times_delivered"] for r in rows] == [0] * 4

    stop_b.clear()
    running_b = asyncio.create_task(b.run(stop_b))
    await eventually(lambda: _projected(pool, rids), 5, "B did not take the batch over")
    stop_b.set()
    await asyncio.wait_for(running_b, 5)
    assert b.dead_lettered == 0 and await redis_client.xlen(dead_letter_stream()) == 0
    assert await group_pending(redis_client, 4) == 0
    await unreachable.close()


async def _projected(pool: asyncpg.Pool, rids: list[str]) -> bool:
    return await order_ids(pool) == set(rids)


async def test_a_batch_stuck_on_a_slow_postgres_stays_with_its_consumer(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    await open_sale(gateway, "sale-1", stock=10)
    rids = await place(gateway, "sale-1", ["u0", "u1"])
    stream = gateway.keys_for_sale("sale-1").events
    a = make_projector("a", claim_idle_ms=300)
    b = make_projector("b", claim_idle_ms=300, max_deliveries=2)
    await a.ensure_groups()
    stop = asyncio.Event()
    async with pool.acquire() as blocker, blocker.transaction():
        # Someone holds a lock the projection needs: A's batch waits on it, for seconds.
        await blocker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        running_a = asyncio.create_task(a.run(stop))
        await asyncio.sleep(0.3)
        running_b = asyncio.create_task(b.run(stop))
        await asyncio.sleep(2.0)
        rows = await redis_client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)
        assert [(text(r["consumer"]), r["times_delivered"]) for r in rows] == [("a", 1)] * 3
    await eventually(lambda: _projected(pool, rids), 5, "A did not finish once unblocked")
    stop.set()
    await asyncio.wait_for(asyncio.gather(running_a, running_b), 5)
    assert a.dead_lettered == b.dead_lettered == 0 and b.projected == 0
    assert await group_pending(redis_client, 4) == 0
