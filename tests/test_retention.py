"""Stream retention against real Redis and PostgreSQL: a stream is trimmed only below what
every consumer group acknowledged and the archive holds, and the log read back through the
archive plus the stream tail loses nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from consumers.deadletter import list_parked, retry_parked
from consumers.retention import trim_partition, trim_streams
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, dead_letter_stream
from core.settings import Settings
from projections.verify import verify
from tests.conftest import ProjectorFactory
from tests.daemons import (
    caught_up,
    cli,
    entry_ids,
    env_for,
    eventually,
    logged,
    order_ids,
    running,
    sale_in_partition,
    start,
    stop_all,
    stream_length,
    terminate,
    wait_started,
)
from tests.helpers import REFUSE_MALLORY, command_calls, open_sale, place, text


async def stream_ids(client: aioredis.Redis, stream: str) -> list[str]:
    return await entry_ids(client, stream)


async def test_trim_keeps_whatever_a_group_has_not_acknowledged_or_the_archive_lacks(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    sale = sale_in_partition(1, prefix="keep")
    await open_sale(gateway, sale, stock=50)
    await place(gateway, sale, [f"u{i}" for i in range(12)])
    stream = gateway.keys_for_sale(sale).events
    ids = await stream_ids(redis_client, stream)  # SaleCreated + 12 placements

    p = make_projector("p", batch=5, max_deliveries=1)
    await p.ensure_groups()
    await p.handle(await p.read_new(block_ms=10))  # entries 0-4: acknowledged and archived
    held = await p.read_new(block_ms=10)  # entries 5-9: pending; 10-12: not delivered

    results = await trim_streams(redis_client, pool, 4)
    assert (results[1].trimmed, results[1].kept_from, results[1].stopped_by) == (
        5,
        ids[5],
        "consumers",
    )
    assert await stream_ids(redis_client, stream) == ids[5:]
    assert all(r.trimmed == 0 for r in results if r.partition != 1)

    # Another group that has read nothing yet holds everything where it is.
    await redis_client.xgroup_create(stream, "audit", id="0")
    assert (await trim_streams(redis_client, pool, 4))[1].trimmed == 0

    async def audit_reads_everything() -> None:
        reply: Any = await redis_client.xreadgroup("audit", "a", {stream: ">"}, count=100)
        await redis_client.xack(stream, "audit", *[entry_id for entry_id, _ in reply[0][1]])

    await audit_reads_everything()
    assert (await trim_streams(redis_client, pool, 4))[1].trimmed == 0  # projector still holds

    # An acknowledged entry the archive does not hold (PostgreSQL refused it, it is parked)
    # stops the trim; an unparseable entry, parked and acknowledged, does not.
    async with pool.acquire() as conn:
        await conn.execute(REFUSE_MALLORY)
    refused_rid = (await gateway.reserve(sale, "mallory", 1, None)).reservation_id
    junk = text(await redis_client.xadd(stream, {"event": "garbage"}))
    await place(gateway, sale, ["late-1", "late-2"])
    ids_after = await stream_ids(redis_client, stream)
    await audit_reads_everything()
    await p.handle(held)
    while batch := await p.read_new(block_ms=10):
        await p.handle(batch)
    parked = {p.stream_id: p for p in await list_parked(redis_client)}
    assert len(parked) == 2 and junk in parked
    refused_id = next(stream_id for stream_id in parked if stream_id != junk)

    result = (await trim_streams(redis_client, pool, 4))[1]
    assert (result.kept_from, result.stopped_by) == (refused_id, "archive")
    assert (await stream_ids(redis_client, stream))[0] == refused_id

    async with pool.acquire() as conn:
        await conn.execute("DROP TRIGGER refuse_mallory ON orders")
    outcomes = await retry_parked(redis_client, pool, 4, [parked[refused_id].id])
    assert [o.result for o in outcomes] == ["projected"]
    result = (await trim_streams(redis_client, pool, 4))[1]
    # Refused, junk and late-1 go; the newest entry always stays.
    assert result.stopped_by == "consumers" and result.trimmed == 3
    assert await stream_ids(redis_client, stream) == ids_after[-1:]
    assert [p.stream_id for p in await list_parked(redis_client)] == [junk]  # bytes kept
    assert refused_rid in await order_ids(pool)


async def test_trimmed_log_verifies_clean_and_replays_everything(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
):
    sales = [sale_in_partition(p, prefix="trim") for p in range(4)]
    p = make_projector("p", batch=100)
    await p.ensure_groups()
    rids: list[str] = []
    for round_ in range(3):
        for sale in sales:
            if round_ == 0:
                await open_sale(gateway, sale, stock=100, per_user_limit=3)
            placed = await place(gateway, sale, [f"r{round_}-u{i}" for i in range(8)])
            rids += placed
            await gateway.confirm(placed[0], None)
            await gateway.cancel(placed[1], f"r{round_}-u1")
        while batch := await p.read_new(block_ms=10):
            await p.handle(batch)
        # Per sale 8 placed, 1 confirmed, 1 cancelled (and 1 created at first): all but the
        # newest entry of each stream go.
        trimmed = sum(r.trimmed for r in await trim_streams(redis_client, pool, 4))
        assert trimmed == 4 * 10
        assert await stream_length(redis_client, 4) == 4

    # Placed after the last trim: the log is archive + this tail.
    late = await place(gateway, sales[0], ["late"])
    report = await verify(gateway, pool)
    assert report.clean, report.to_table()
    assert report.events == 4 * (1 + 3 * 10) + 1
    assert await order_ids(pool) == set(rids)  # "late" not projected yet: lag, not drift
    while batch := await p.read_new(block_ms=10):
        await p.handle(batch)
    assert await order_ids(pool) == set(rids + late)
    assert (await verify(gateway, pool)).clean


async def test_consume_daemon_trims_its_streams_as_it_goes(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sales = [sale_in_partition(p, prefix="daemon") for p in range(4)]
    for sale in sales:
        await open_sale(gateway, sale, stock=200)
    env = env_for(
        settings.redis_url or "", settings.database_url or "", FLASHSALE_RETENTION_INTERVAL_MS="200"
    )
    log_path = tmp_path / "consume.log"
    proc = start(["consume"], env, log_path)
    try:
        await wait_started(proc, log_path)
        alive = running((proc, log_path))
        rids: list[str] = []
        for i in range(5):
            for sale in sales:
                rids += await place(gateway, sale, [f"w{i}-u{j}" for j in range(20)])

            async def trimmed_to_the_newest() -> bool:
                return await stream_length(redis_client, 4) == 4

            await eventually(trimmed_to_the_newest, 15, "streams were not trimmed", alive)
        assert await order_ids(pool) == set(rids)
        assert sum(r["trimmed"] for r in logged(log_path, "stream_trimmed")) == len(rids)
        assert await redis_client.xlen(dead_letter_stream()) == 0
        info = await redis_client.xinfo_groups(gateway.keys_for_sale(sales[0]).events)
        assert [(text(g["name"]), g["pending"]) for g in info] == [(CONSUMER_GROUP, 0)]
        assert await caught_up(redis_client, pool, 4) is False  # archive > stream now
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)


async def test_a_long_backlog_is_trimmed_one_chunk_per_xtrim(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    make_projector: ProjectorFactory,
):
    sale = sale_in_partition(2, prefix="steps")
    await open_sale(gateway, sale, stock=50)
    await place(gateway, sale, [f"u{i}" for i in range(12)])
    stream = gateway.keys_for_sale(sale).events
    ids = await stream_ids(redis_client, stream)  # SaleCreated + 12 placements
    p = make_projector("p", batch=100)
    await p.ensure_groups()
    await p.handle(await p.read_new(block_ms=10))

    async def xtrim_calls() -> int:
        return await command_calls(redis_client, "XTRIM")

    before = await xtrim_calls()
    result = await trim_partition(redis_client, pool, 2, 4, chunk=4)
    # 12 of 13 may go (the newest entry stays): three full chunks of 4, one XTRIM each, and
    # the last XTRIM finds nothing left below the newest entry.
    assert (result.trimmed, result.kept_from, result.stopped_by) == (12, ids[-1], "consumers")
    assert await stream_ids(redis_client, stream) == ids[-1:]
    assert await xtrim_calls() - before == 4
