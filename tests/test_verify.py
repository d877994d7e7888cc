"""``flashsale replay verify``: clean after projection, and every kind of drift injected by
hand into Redis or PostgreSQL is found and named, by the function and by the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from core.gateway import RedisGateway
from core.keys import PartitionKeys, partition_of
from core.settings import Settings
from projections.verify import Difference, verify
from tests.conftest import ProjectorFactory
from tests.helpers import open_sale, project_all

FLASHSALE = Path(sys.executable).parent / "flashsale"

USERS = [f"user-{i}" for i in range(8)]


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run the console script; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(FLASHSALE),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def bare_env(**extra: str) -> dict[str, str]:
    """The environment without any FLASHSALE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(extra)
    return env


def cli_env(settings: Settings) -> dict[str, str]:
    return bare_env(
        FLASHSALE_REDIS_URL=settings.redis_url or "",
        FLASHSALE_DATABASE_URL=settings.database_url or "",
        FLASHSALE_PARTITIONS=str(settings.partitions),
    )


async def replay_verify(settings: Settings, *flags: str) -> tuple[int, str, str]:
    return await run_cli(cli_env(settings), "replay", "verify", *flags)


@pytest.fixture
async def projected_sales(
    gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
) -> dict[str, list[str]]:
    """Two sales in different partitions with reservations, projected: sale -> reservation ids."""
    assert partition_of("sale-1", 4) != partition_of("sale-2", 4)
    placed: dict[str, list[str]] = {}
    for sale_id in ("sale-1", "sale-2"):
        await open_sale(gateway, sale_id, stock=20, per_user_limit=2)
        placed[sale_id] = [
            (await gateway.reserve(sale_id, user, 1 + i % 2, None)).reservation_id
            for i, user in enumerate(USERS)
        ]
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)
    return placed


def sale_keys(sale_id: str) -> PartitionKeys:
    return PartitionKeys(partition_of(sale_id, 4), 4)


# --- 1. clean -------------------------------------------------------------------------------


async def test_verify_is_clean_after_projection(
    projected_sales: dict[str, list[str]],
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    settings: Settings,
):
    report = await verify(gateway, pool)
    assert report.clean, report.differences
    assert (report.sales, report.events, report.malformed) == (2, 2 * (1 + len(USERS)), 0)
    assert (await verify(gateway, pool, "sale-2")).clean

    code, out, err = await replay_verify(settings)
    assert code == 0, out + err
    assert out.startswith("clean: 2 sales, 18 events")

    code, out, err = await replay_verify(settings, "--json")
    assert code == 0, out + err
    body = json.loads(out)
    assert body["clean"] is True and body["differences"] == []
    assert (body["sales"], body["events"]) == (2, 18)


async def test_verify_skips_malformed_log_entries(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "sale-1", stock=5)
    stream = sale_keys("sale-1").events
    await redis_client.xadd(stream, {"event": "not json"})
    old_version = {"type": "SaleClosed", "v": 0, "event_id": "x", "sale_id": "sale-1"}
    await redis_client.xadd(stream, {"event": json.dumps(old_version | {"occurred_at": 1})})
    await gateway.reserve("sale-1", "alice", 1, None)
    # parks both on the dead-letter stream
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)

    report = await verify(gateway, pool)
    assert report.clean, report.differences
    assert (report.events, report.malformed) == (2, 2)
    code, out, err = await replay_verify(settings, "--json")
    assert code == 0, out + err
    assert json.loads(out)["malformed"] == 2


# --- 2 and 3. drift in Redis ----------------------------------------------------------------


def _only(differences: list[Difference]) -> Difference:
    assert len(differences) == 1, differences
    return differences[0]


async def _assert_cli_names(settings: Settings, expected: Difference) -> None:
    code, out, err = await replay_verify(settings)
    assert code == 1, out + err
    assert out.startswith("DRIFT: 1 differences")
    row = next(line for line in out.splitlines() if line.startswith(expected.sale_id))
    assert row.split()[:3] == [expected.sale_id, expected.source, expected.field], out

    code, out, err = await replay_verify(settings, "--json")
    assert code == 1, out + err
    body = json.loads(out)
    assert body["clean"] is False
    assert [(d["sale_id"], d["source"], d["field"]) for d in body["differences"]] == [
        (expected.sale_id, expected.source, expected.field)
    ]


async def test_redis_remaining_drift_is_found(
    projected_sales: dict[str, list[str]],
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    before = await gateway.get_sale("sale-2")
    assert before is not None
    await redis_client.hincrby(sale_keys("sale-2").sale("sale-2"), "remaining", 1)

    found = _only((await verify(gateway, pool)).differences)
    assert found == Difference(
        "sale-2", "redis", "remaining", before.remaining, before.remaining + 1
    )
    assert (await verify(gateway, pool, "sale-1")).clean  # the other sale is not blamed
    await _assert_cli_names(settings, found)
    _, out, _ = await replay_verify(settings, "--json")
    (listed,) = json.loads(out)["differences"]
    assert (listed["expected"], listed["actual"]) == (before.remaining, before.remaining + 1)


async def test_redis_holder_removed_is_found(
    projected_sales: dict[str, list[str]],
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await redis_client.hdel(sale_keys("sale-1").holders("sale-1"), "user-1")

    found = _only((await verify(gateway, pool)).differences)
    assert found == Difference("sale-1", "redis", "holder:user-1", 2, 0)
    await _assert_cli_names(settings, found)


async def test_redis_reservation_status_changed_is_found(
    projected_sales: dict[str, list[str]],
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    rid = projected_sales["sale-1"][3]
    await redis_client.hset(sale_keys("sale-1").reservation(rid), "status", "confirmed")

    found = _only((await verify(gateway, pool)).differences)
    assert found == Difference(
        "sale-1",
        "redis",
        f"reservation:{rid}",
        ("pending", 2, "user-3"),
        ("confirmed", 2, "user-3"),
    )
    await _assert_cli_names(settings, found)


# --- 4. drift in PostgreSQL -----------------------------------------------------------------


Drift = Callable[[asyncpg.Connection, dict[str, list[str]]], Awaitable[Any]]


async def _remaining_plus_one(conn: asyncpg.Connection, placed: dict[str, list[str]]) -> str:
    await conn.execute("UPDATE stock_view SET remaining = remaining + 1 WHERE sale_id = 'sale-1'")
    return "remaining"


async def _order_deleted(conn: asyncpg.Connection, placed: dict[str, list[str]]) -> str:
    rid = placed["sale-1"][0]
    await conn.execute("DELETE FROM orders WHERE reservation_id = $1", rid)
    return f"order:{rid}"


async def _order_cancelled(conn: asyncpg.Connection, placed: dict[str, list[str]]) -> str:
    rid = placed["sale-1"][5]
    await conn.execute("UPDATE orders SET status = 'cancelled' WHERE reservation_id = $1", rid)
    return f"order:{rid}"


@pytest.mark.parametrize(
    ("drift", "expected", "actual"),
    [
        (_remaining_plus_one, 20 - 12, 20 - 12 + 1),
        (_order_deleted, ("pending", 1, "user-0"), None),
        (_order_cancelled, ("pending", 2, "user-5"), ("cancelled", 2, "user-5")),
    ],
    ids=["stock_view remaining", "order deleted", "order status"],
)
async def test_postgres_drift_is_found(
    projected_sales: dict[str, list[str]],
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    settings: Settings,
    drift: Drift,
    expected: Any,
    actual: Any,
):
    async with pool.acquire() as conn:
        field = await drift(conn, projected_sales)

    found = _only((await verify(gateway, pool)).differences)
    assert found == Difference("sale-1", "postgres", field, expected, actual)
    await _assert_cli_names(settings, found)


async def test_several_drifts_are_all_listed(
    projected_sales: dict[str, list[str]],
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await redis_client.hincrby(sale_keys("sale-2").sale("sale-2"), "held", -1)
    async with pool.acquire() as conn:
        deleted = await _order_deleted(conn, projected_sales)
        await _remaining_plus_one(conn, projected_sales)

    found = {(d.sale_id, d.source, d.field) for d in (await verify(gateway, pool)).differences}
    assert found == {
        ("sale-2", "redis", "held"),
        ("sale-1", "postgres", deleted),
        ("sale-1", "postgres", "remaining"),
    }
    code, out, err = await replay_verify(settings, "--json")
    assert code == 1, out + err
    listed = {(d["sale_id"], d["source"], d["field"]) for d in json.loads(out)["differences"]}
    assert listed == found


# --- 5. nothing to connect to ---------------------------------------------------------------


def _refused_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_verify_without_urls_is_a_clear_error():
    code, out, err = await run_cli(bare_env(), "replay", "verify")
    assert code != 0
    assert "Traceback" not in err and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error:") and "FLASHSALE_REDIS_URL" in line, line


async def test_verify_without_urls_exits_2():
    code, _, _ = await run_cli(bare_env(), "replay", "verify")
    assert code == 2


async def test_verify_with_nothing_listening_exits_2_with_one_line():
    port = _refused_port()
    env = bare_env(
        FLASHSALE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        FLASHSALE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/postgres",
    )
    code, out, err = await run_cli(env, "replay", "verify")
    assert code == 2, out + err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error:") and "cannot connect to PostgreSQL" in line, line


async def test_verify_with_redis_unreachable_exits_2_with_one_line(
    pool: asyncpg.Pool, settings: Settings
):
    env = cli_env(settings) | {"FLASHSALE_REDIS_URL": f"redis://127.0.0.1:{_refused_port()}/0"}
    code, out, err = await run_cli(env, "replay", "verify")
    assert code == 2, out + err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error:") and "redis" in line, line


async def test_verify_with_a_malformed_database_url_is_a_clear_error():
    env = bare_env(
        FLASHSALE_REDIS_URL=f"redis://127.0.0.1:{_refused_port()}/0",
        FLASHSALE_DATABASE_URL="not-a-url",
    )
    code, _, err = await run_cli(env, "replay", "verify")
    assert code == 2 and "Traceback" not in err, err


# --- verify while traffic and the projector are live ----------------------------------------


async def test_verify_during_live_traffic_reports_no_drift(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    sale_ids = ["live-1", "live-2", "live-3"]
    for sale_id in sale_ids:
        await open_sale(gateway, sale_id, stock=100_000, per_user_limit=1)
    p = make_projector("live", batch=5, block_ms=5)
    await p.ensure_groups()
    stop = asyncio.Event()

    async def buy() -> None:
        n = 0
        while not stop.is_set():
            await asyncio.gather(*(gateway.reserve(s, f"u{n}", 1, None) for s in sale_ids))
            n += 1
            await asyncio.sleep(0.001)

    tasks = [asyncio.create_task(p.run(stop)), asyncio.create_task(buy())]
    reports = []
    try:
        for _ in range(40):
            reports.append(await verify(gateway, pool))
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert p.projected > 0
    drift = [d for r in reports for d in r.differences]
    assert drift == [], drift[:5]


async def test_entries_pending_on_a_dead_consumer_are_lag_not_drift(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "sale-1", stock=50, per_user_limit=1)
    for i in range(5):
        await gateway.reserve("sale-1", f"early-{i}", 1, None)
    dead = make_projector("dead")
    await dead.ensure_groups()
    assert len(await dead.read_new(block_ms=10)) == 6  # read, then the process dies
    for i in range(5):
        await gateway.reserve("sale-1", f"late-{i}", 1, None)
    # another consumer projects the rest
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)

    report = await verify(gateway, pool)
    assert report.clean, report.differences


async def test_an_event_acknowledged_but_never_projected_is_reported_lost(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "sale-1", stock=5, per_user_limit=1)
    await project_all(redis_client, pool, settings.partitions, "verify-test", 100)
    placed = await gateway.reserve("sale-1", "u1", 1, None)
    buggy = make_projector("acks-too-early")
    await buggy.ensure_groups()
    delivered = await buggy.read_new(block_ms=10)
    assert len(delivered) == 1
    await buggy.ack(delivered)  # acknowledged, but the PostgreSQL write never happened

    lost_event = json.loads(delivered[0].fields["event"])
    assert lost_event["reservation_id"] == placed.reservation_id

    report = await verify(gateway, pool)
    assert [(d.sale_id, d.source, d.field, d.actual) for d in report.differences] == [
        ("sale-1", "postgres", f"event:{lost_event['event_id']}", "lost")
    ]
    assert report.lagging == 0
