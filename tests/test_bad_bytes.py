"""Entries whose bytes are not UTF-8: parked at once, and nothing that reads the log stops.

Anyone with access to Redis can XADD anything into a partition stream. Such an entry is no
event: the projector parks it on the dead-letter stream with its bytes as they were and
projects the rest of its batch; retention, verify, repair and rebuild count it and go on;
``flashsale dlq list`` shows it and ``flashsale dlq drop`` deletes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from consumers.deadletter import list_parked, retry_parked
from consumers.retention import trim_streams
from core.gateway import RedisGateway
from core.keys import dead_letter_stream
from core.settings import Settings
from projections.rebuild import rebuild
from projections.repair import repair_redis
from projections.verify import verify
from tests.conftest import ProjectorFactory
from tests.daemons import (
    cli,
    cli_json,
    env_for,
    eventually,
    group_pending,
    order_ids,
    running,
    sale_in_partition,
    start,
    stop_all,
    terminate,
    wait_started,
)
from tests.helpers import open_sale, place

BAD_EVENT = b"\xff\xfe not UTF-8 at all"


async def write_junk(client: aioredis.Redis, stream: str) -> list[str]:
    """Three kinds of undecodable entry: the event, another field, a field name."""
    ids = []
    for fields in (
        {"event": BAD_EVENT},
        {"event": b"{}", "note": b"caf\xe9"},
        {b"\xc3\x28": b"x"},
    ):
        entry_id = await client.xadd(stream, fields)  # type: ignore[arg-type]
        ids.append(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
    return ids


async def test_consume_parks_entries_that_are_not_utf8_and_projects_the_rest(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sales = [sale_in_partition(p, prefix="bytes") for p in range(4)]
    for sale in sales:
        await open_sale(gateway, sale, stock=1000)
    stream = gateway.keys_for_partition(0).events
    # Mid-sale, in the same batch as the reservations around it (the daemon starts after).
    rids = await place(gateway, sales[0], [f"a{i}" for i in range(40)])
    junk = await write_junk(redis_client, stream)
    for sale in sales:
        rids += await place(gateway, sale, [f"b{i}" for i in range(40)])
    env = env_for(settings.redis_url or "", settings.database_url or "")
    log_path = tmp_path / "consume.log"
    proc = start(["consume"], env, log_path)
    try:
        await wait_started(proc, log_path)

        async def projected() -> bool:
            return await order_ids(pool) == set(rids) and not await group_pending(redis_client, 4)

        await eventually(projected, 20, "the batch stayed stuck", running((proc, log_path)))
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)

    # Parked once each, with the original bytes, origin and the reason.
    raw: Any = await redis_client.xrange(dead_letter_stream())
    assert len(raw) == 3
    by_origin = {fields[b"stream_id"].decode(): fields for _, fields in raw}
    assert set(by_origin) == set(junk)
    assert by_origin[junk[0]][b"field:event"] == BAD_EVENT
    assert by_origin[junk[1]][b"field:note"] == b"caf\xe9"
    assert by_origin[junk[2]][b"field:\xc3\x28"] == b"x"
    assert b"not UTF-8" in by_origin[junk[0]][b"error"]
    assert b"'event'" in by_origin[junk[0]][b"error"]

    # The operator sees them (escaped), cannot re-drive them, and can drop them.
    listed = await cli_json(env, "dlq", "list")
    assert {e["stream_id"]: e["undecodable"] for e in listed} == dict.fromkeys(junk, True)
    shown = next(e for e in listed if e["stream_id"] == junk[0])
    assert shown["fields"] == {"event": "\\xff\\xfe not UTF-8 at all"}
    rc, out = await cli(env, "dlq", "list")
    assert rc == 0 and "field 'event' is not UTF-8" in out, out
    outcomes = await retry_parked(redis_client, pool, 4)
    assert [o.result for o in outcomes] == ["failed"] * 3
    assert all("not UTF-8" in o.detail for o in outcomes)
    rc, out = await cli(env, "dlq", "drop", *[e["id"] for e in listed])
    assert rc == 0, out
    assert await redis_client.xlen(dead_letter_stream()) == 0


async def test_log_readers_and_retention_count_undecodable_entries_and_go_on(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    sale = sale_in_partition(2, prefix="reader")
    await open_sale(gateway, sale, stock=100)
    stream = gateway.keys_for_sale(sale).events
    rids = await place(gateway, sale, [f"u{i}" for i in range(10)])
    junk = await write_junk(redis_client, stream)
    rids += await place(gateway, sale, [f"v{i}" for i in range(10)])
    projector = make_projector("p", batch=7)
    await projector.ensure_groups()
    while batch := await projector.read_new(block_ms=10):
        await projector.handle(batch)
    assert projector.dead_lettered == 3
    assert [p.stream_id for p in await list_parked(redis_client)] == junk
    assert await order_ids(pool) == set(rids)

    report = await verify(gateway, pool)
    assert report.clean, report.differences
    assert (report.events, report.malformed) == (21, 3)
    env = env_for(settings.redis_url or "", settings.database_url or "")
    rc, out = await cli(env, "replay", "verify")
    assert rc == 0, out
    assert "3 log entries are no event" in out
    assert (await verify(gateway, pool, sale)).clean

    repaired = await repair_redis(gateway, pool)
    assert repaired.clean and repaired.count("clean") == 1
    rebuilt = await rebuild(gateway, pool)
    assert rebuilt.malformed == 3
    assert (await verify(gateway, pool)).clean

    # Retention trims past them (acknowledged and parked: no events), keeping the newest.
    results = await trim_streams(redis_client, pool, 4)
    assert (results[2].trimmed, results[2].malformed) == (1 + 20 + 3 - 1, 3)
    assert await redis_client.xlen(stream) == 1
    report = await verify(gateway, pool)
    assert report.clean and report.events == 21 and report.malformed == 0
    assert json.loads(report.to_json())["malformed"] == 0
