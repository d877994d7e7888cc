"""Pruning final reservations from Redis, against real Redis and PostgreSQL: only final
reservations whose final event the archive holds go, repeating a round changes nothing,
the API answers pruned reservations as it did before, and a buyer looping reserve/cancel
leaves Redis memory flat once pruned."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from api.web.app import create_app
from api.web.state import ORDERS_POOL
from consumers.expiry import ExpiryWorker
from consumers.pruning import checkpoint_of, prune_reservations
from consumers.retention import trim_streams
from core.gateway import RedisGateway
from core.keys import PartitionKeys
from core.settings import Settings
from projections.verify import verify
from tests.conftest import AppServerFactory, ProjectorFactory
from tests.daemons import (
    env_for,
    eventually,
    logged,
    running,
    start,
    stop_all,
    terminate,
    wait_started,
)
from tests.helpers import every_key, open_sale, project_all, text
from tests.http_helpers import ADMIN, buyer, expect_problem, session_for

FINAL = ("confirmed", "cancelled", "expired")


async def add_buyer_sets(gateway: RedisGateway, client: aioredis.Redis, sale_id: str) -> None:
    """Put every reservation of a sale in its buyer's set, as reserve.lua does once the
    buyer's "my reservations" set exists (a parallel change); idempotent."""
    keys = gateway.keys_for_sale(sale_id)
    for rid in await client.smembers(keys.reservations(sale_id)):
        user = text(await client.hget(keys.reservation(text(rid)), "user_id") or b"")
        await client.sadd(keys.user_reservations(sale_id, user), rid)


async def dump(client: aioredis.Redis) -> dict[str, Any]:
    """Every key and its value (streams excluded: pruning never touches them)."""
    out: dict[str, Any] = {}
    for raw in await every_key(client):
        key = text(raw)
        kind = text(await client.type(key))
        if kind == "hash":
            out[key] = await client.hgetall(key)
        elif kind == "set":
            out[key] = await client.smembers(key)
        elif kind == "zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            out[key] = await client.get(key)
    return out


async def place(gateway: RedisGateway, sale_id: str, user: str, key: str | None = None) -> str:
    return (await gateway.reserve(sale_id, user, 1, key)).reservation_id


async def lifecycle(gateway: RedisGateway) -> dict[str, str]:
    """One reservation in each state, over two sales; returns name -> reservation id."""
    await open_sale(gateway, "keep", stock=10, per_user_limit=5)
    await open_sale(gateway, "short", stock=10, hold_seconds=1)
    ids = {
        "confirmed": await place(gateway, "keep", "ann", key="k-ann"),
        "cancelled": await place(gateway, "keep", "bob"),
        "pending": await place(gateway, "keep", "cat"),
        "expired": await place(gateway, "short", "dan"),
    }
    await gateway.confirm(ids["confirmed"], "ann")
    await gateway.cancel(ids["cancelled"], "bob")
    await asyncio.sleep(1.1)
    assert await ExpiryWorker(gateway).sweep() == 1
    return ids


async def in_redis(gateway: RedisGateway, client: aioredis.Redis, sale_id: str, rid: str) -> bool:
    keys = gateway.keys_for_sale(sale_id)
    hash_there = bool(await client.exists(keys.reservation(rid)))
    in_set = bool(await client.sismember(keys.reservations(sale_id), rid))
    assert hash_there == in_set, "a reservation's hash and its id in the sale's set go together"
    return hash_there


async def test_only_final_reservations_the_archive_holds_are_pruned(
    gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
):
    ids = await lifecycle(gateway)
    await project_all(redis_client, pool, settings.partitions)
    # Final after the projector caught up: its event is not archived yet.
    late = await place(gateway, "keep", "eve")
    await gateway.confirm(late, "eve")
    for sale in ("keep", "short"):
        await add_buyer_sets(gateway, redis_client, sale)
    counters = {
        s: await redis_client.hgetall(gateway.keys_for_sale(s).sale(s)) for s in ("keep", "short")
    }
    holders = {
        s: await redis_client.hgetall(gateway.keys_for_sale(s).holders(s))
        for s in ("keep", "short")
    }

    # Kept for an hour after their final event: nothing goes yet.
    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 3600)) == 0
    for sale, name in (("keep", "confirmed"), ("keep", "cancelled"), ("short", "expired")):
        assert await in_redis(gateway, redis_client, sale, ids[name]), name

    results = await prune_reservations(gateway, pool, 0, batch=1)
    assert sum(r.pruned for r in results) == 3
    assert sum(r.kept for r in results) == 0
    for name, sale, user in (
        ("confirmed", "keep", "ann"),
        ("cancelled", "keep", "bob"),
        ("expired", "short", "dan"),
    ):
        rid = ids[name]
        assert not await in_redis(gateway, redis_client, sale, rid), name
        keys = gateway.keys_for_sale(sale)
        assert not await redis_client.sismember(keys.user_reservations(sale, user), rid), name
    assert await in_redis(gateway, redis_client, "keep", ids["pending"])
    assert await in_redis(gateway, redis_client, "keep", late)
    keys = gateway.keys_for_sale("keep")
    assert await redis_client.sismember(keys.user_reservations("keep", "cat"), ids["pending"])
    assert await redis_client.sismember(keys.user_reservations("keep", "eve"), late)
    # Counters and holders (the per-buyer quantities behind the limit) are untouched, and
    # no event was appended.
    for s in ("keep", "short"):
        assert await redis_client.hgetall(gateway.keys_for_sale(s).sale(s)) == counters[s]
        assert await redis_client.hgetall(gateway.keys_for_sale(s).holders(s)) == holders[s]
    assert await redis_client.hget(keys.holders("keep"), "ann") == b"1"  # ann bought 1

    # A second round, and a round from scratch (checkpoints lost), change nothing.
    before = await dump(redis_client)
    stream_lengths = [await redis_client.xlen(PartitionKeys(p, 4).events) for p in range(4)]
    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 0
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM prune_checkpoints")
    again = await prune_reservations(gateway, pool, 0, batch=1)
    assert sum(r.pruned for r in again) == 3  # the same three, already gone: still gone
    assert await dump(redis_client) == before
    assert [await redis_client.xlen(PartitionKeys(p, 4).events) for p in range(4)] == stream_lengths

    # Once its final event is archived, the late one goes too; the pending one never does.
    await project_all(redis_client, pool, settings.partitions)
    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 1
    assert not await in_redis(gateway, redis_client, "keep", late)
    assert await in_redis(gateway, redis_client, "keep", ids["pending"])
    partition = gateway.keys_for_sale("keep").partition
    assert await checkpoint_of(pool, partition) > (0, 0)


async def test_an_entry_not_acknowledged_by_the_group_bounds_the_pruning(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "keep", stock=10, per_user_limit=5)
    first = await place(gateway, "keep", "ann")
    await gateway.cancel(first, "ann")
    projector = make_projector("p", batch=500)
    await projector.ensure_groups()
    await projector.handle(await projector.read_new(block_ms=10))
    second = await place(gateway, "keep", "bob")
    await gateway.cancel(second, "bob")
    held = await projector.read_new(block_ms=10)  # delivered, pending, not archived
    assert held

    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 1
    assert not await in_redis(gateway, redis_client, "keep", first)
    assert await in_redis(gateway, redis_client, "keep", second)

    await projector.handle(held)
    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 1
    assert not await in_redis(gateway, redis_client, "keep", second)


async def test_the_consume_daemon_prunes_as_it_goes(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    await open_sale(gateway, "keep", stock=100, per_user_limit=100)
    env = env_for(
        settings.redis_url or "",
        settings.database_url or "",
        FLASHSALE_PRUNE_INTERVAL_MS="200",
        FLASHSALE_PRUNE_AFTER_SECONDS="0",
        FLASHSALE_PRUNE_BATCH="7",
    )
    log_path = tmp_path / "consume.log"
    proc = start(["consume"], env, log_path)
    try:
        await wait_started(proc, log_path)
        alive = running((proc, log_path))
        rids = [await place(gateway, "keep", f"u{i}") for i in range(30)]
        for i, rid in enumerate(rids[:20]):
            await gateway.cancel(rid, f"u{i}")
        reservations = gateway.keys_for_sale("keep").reservations("keep")

        async def only_pending_left() -> bool:
            return {text(r) for r in await redis_client.smembers(reservations)} == set(rids[20:])

        async def round_logged() -> bool:  # the round logs once it is over
            return int(sum(r["count"] for r in logged(log_path, "reservations_pruned"))) >= 20

        await eventually(only_pending_left, 20, "final reservations were not pruned", alive)
        await eventually(round_logged, 20, "the pruning round was not logged", alive)
        assert sum(r["count"] for r in logged(log_path, "reservations_pruned")) == 20
        assert {text(r) for r in await redis_client.smembers(reservations)} == set(rids[20:])
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)


# --------------------------------------------------------------------------- the API


@pytest.fixture
async def http(pool: asyncpg.Pool, serve_app: AppServerFactory) -> aiohttp.ClientSession:
    """The app, started after the database is reset (pruned reservations are read from it)."""
    return await serve_app()


async def call(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any = None,
) -> tuple[int, Any]:
    async with session.request(method, path, json=body, headers=headers) as r:
        if r.status >= 400:
            return r.status, await expect_problem(r, r.status)
        return r.status, await r.json()


async def answers(session: aiohttp.ClientSession, ids: dict[str, str]) -> dict[str, Any]:
    """What the API says about every reservation, to every asker, for every action."""
    owners = {"confirmed": "ann", "cancelled": "bob", "expired": "dan"}
    out: dict[str, Any] = {}
    for name, owner in owners.items():
        rid = ids[name]
        for asker, headers in (("owner", buyer(owner)), ("other", buyer("zed")), ("admin", ADMIN)):
            out[f"{name} get {asker}"] = await call(
                session, "GET", f"/v1/reservations/{rid}", headers
            )
            out[f"{name} confirm {asker}"] = await call(
                session, "POST", f"/v1/reservations/{rid}/confirm", headers
            )
        out[f"{name} cancel owner"] = await call(
            session, "POST", f"/v1/reservations/{rid}/cancel", buyer(owner)
        )
        out[f"{name} cancel other"] = await call(
            session, "POST", f"/v1/reservations/{rid}/cancel", buyer("zed")
        )
    out["replay"] = await call(
        session,
        "POST",
        "/v1/sales/keep/reservations",
        buyer("ann") | {"Idempotency-Key": "k-ann"},
        {"qty": 1},
    )
    out["unknown"] = await call(session, "GET", "/v1/reservations/0-feedbeef", ADMIN)
    return out


def without_instance(found: dict[str, Any]) -> dict[str, Any]:
    """Answers without the problem ``instance``/``detail`` texts, which name no state."""
    out = {}
    for name, (status, body) in found.items():
        if status >= 400:
            body = {"status": body["status"], "code": body["code"]}
        out[name] = (status, body)
    return out


async def test_the_api_answers_pruned_reservations_as_before(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    ids = await lifecycle(gateway)
    await project_all(redis_client, pool, settings.partitions)
    before = without_instance(await answers(http, ids))

    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 3
    for name, sale in (("confirmed", "keep"), ("cancelled", "keep"), ("expired", "short")):
        assert not await in_redis(gateway, redis_client, sale, ids[name])
    after = without_instance(await answers(http, ids))

    assert after == before
    # What they are, spelled out.
    assert after["confirmed get owner"][0] == 200
    assert after["confirmed get owner"][1]["status"] == "confirmed"
    assert after["confirmed get other"][0] == 404
    assert after["confirmed get admin"][1]["status"] == "confirmed"
    assert after["confirmed confirm owner"][0] == 200
    assert after["confirmed confirm owner"][1]["changed"] is False
    assert after["confirmed cancel owner"] == (409, {"status": 409, "code": "reservation_closed"})
    assert after["cancelled confirm owner"] == (409, {"status": 409, "code": "reservation_closed"})
    assert after["cancelled cancel owner"][0] == 200
    assert after["cancelled cancel owner"][1]["changed"] is False
    assert after["expired confirm owner"] == (409, {"status": 409, "code": "reservation_expired"})
    assert after["expired cancel owner"] == (409, {"status": 409, "code": "reservation_expired"})
    assert after["expired get owner"][1]["status"] == "expired"
    assert after["replay"][0] == 202
    assert after["replay"][1]["reservation_id"] == ids["confirmed"]
    assert after["replay"][1]["status"] == "confirmed"
    assert after["unknown"][0] == 404
    # Nothing the API did after pruning brought a reservation back or logged an event.
    for name, sale in (("confirmed", "keep"), ("cancelled", "keep"), ("expired", "short")):
        assert not await in_redis(gateway, redis_client, sale, ids[name])


async def test_a_pruned_read_without_postgresql_is_503_not_404(
    pool: asyncpg.Pool, settings: Settings, redis_client: aioredis.Redis
):
    app = create_app(settings, redis_client)
    server = TestServer(app)
    async with server, session_for(server) as session:
        await app[ORDERS_POOL].close()  # PostgreSQL out of reach for this process
        status, body = await call(session, "GET", "/v1/reservations/0-feedbeef", ADMIN)
    # Redis does not know it; whether it was pruned only PostgreSQL can say.
    assert (status, body["code"]) == (503, "unavailable")


async def test_a_buyer_still_lists_their_pruned_reservations(
    http: aiohttp.ClientSession,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "keep", stock=20, per_user_limit=10)
    await open_sale(gateway, "short", stock=10, hold_seconds=1)
    await open_sale(gateway, "other", stock=10)
    lapsed = await place(gateway, "short", "ann")
    confirmed = await place(gateway, "keep", "ann")
    await gateway.confirm(confirmed, "ann")
    cancelled = await place(gateway, "keep", "ann")
    await gateway.cancel(cancelled, "ann")
    pending = await place(gateway, "keep", "ann")
    # Someone else's, and ann's in another sale: pruned too, never listed here.
    await gateway.confirm(await place(gateway, "keep", "bob"), "bob")
    await gateway.cancel(await place(gateway, "other", "ann"), "ann")
    await asyncio.sleep(1.1)
    assert await ExpiryWorker(gateway).sweep() == 1
    await project_all(redis_client, pool, settings.partitions)
    # Final after the projector caught up (orders says pending), and never projected.
    late = await place(gateway, "keep", "ann")
    await gateway.confirm(late, "ann")
    fresh = await place(gateway, "keep", "ann")

    async def mine(sale_id: str = "keep") -> list[dict[str, Any]]:
        status, body = await call(
            http, "GET", f"/v1/sales/{sale_id}/reservations/mine", buyer("ann")
        )
        assert status == 200, body
        listed: list[dict[str, Any]] = body["reservations"]
        return listed

    def statuses(listed: list[dict[str, Any]]) -> dict[str, str]:
        return {r["reservation_id"]: r["status"] for r in listed}

    before, before_short = await mine(), await mine("short")
    assert len(before) == 5
    assert statuses(before) == {
        confirmed: "confirmed",
        cancelled: "cancelled",
        pending: "pending",
        late: "confirmed",
        fresh: "pending",
    }
    assert statuses(before_short) == {lapsed: "expired"}

    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 5
    for rid, sale in ((confirmed, "keep"), (cancelled, "keep"), (lapsed, "short")):
        assert not await in_redis(gateway, redis_client, sale, rid)
    # The same answers, in the same order (placement time, then id), from orders for the
    # pruned ones.
    assert await mine() == before
    assert await mine("short") == before_short
    assert [r["status"] for r in await mine("other")] == ["cancelled"]  # in its own sale

    # Final in both (archived, not pruned yet): listed once; then pruned: still there.
    await project_all(redis_client, pool, settings.partitions)
    assert await mine() == before
    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 1
    assert not await in_redis(gateway, redis_client, "keep", late)
    assert await mine() == before
    status, body = await call(http, "GET", "/v1/sales/keep/reservations/mine", buyer("bob"))
    assert status == 200 and [r["status"] for r in body["reservations"]] == ["confirmed"]


async def test_listing_a_buyers_reservations_without_postgresql_is_503(
    pool: asyncpg.Pool, settings: Settings, redis_client: aioredis.Redis, gateway: RedisGateway
):
    await open_sale(gateway, "keep", stock=10)
    await place(gateway, "keep", "ann")
    app = create_app(settings, redis_client)
    server = TestServer(app)
    async with server, session_for(server) as session:
        await app[ORDERS_POOL].close()  # PostgreSQL out of reach for this process
        status, body = await call(session, "GET", "/v1/sales/keep/reservations/mine", buyer("ann"))
        # Redis's list alone could silently miss pruned ones: only PostgreSQL can say.
        assert (status, body["code"]) == (503, "unavailable")
        status, body = await call(session, "GET", "/v1/sales/nope/reservations/mine", buyer("ann"))
        assert (status, body["code"]) == (404, "sale_not_found")


async def test_verify_is_clean_after_pruning(
    gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
):
    await lifecycle(gateway)
    await project_all(redis_client, pool, settings.partitions)
    assert sum(r.pruned for r in await prune_reservations(gateway, pool, 0)) == 3
    report = await verify(gateway, pool)
    assert report.clean, report.to_table()


# --------------------------------------------------------------------------- memory


async def key_bytes(client: aioredis.Redis) -> int:
    """MEMORY USAGE summed over every key but the streams (retention bounds those)."""
    total = 0
    for raw in await every_key(client):
        if text(await client.type(raw)) != "stream":
            total += int(await client.memory_usage(raw, samples=0) or 0)
    return total


async def test_a_buyer_looping_reserve_cancel_leaves_memory_flat_once_pruned(
    gateway: RedisGateway, redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
):
    cycles = 300
    await open_sale(gateway, "loop", stock=1)

    async def loop(n: int) -> None:
        for _ in range(n):
            rid = await place(gateway, "loop", "looper")
            await gateway.cancel(rid, "looper")
        await add_buyer_sets(gateway, redis_client, "loop")

    async def settle() -> int:
        await project_all(redis_client, pool, settings.partitions)
        await prune_reservations(gateway, pool, 0, batch=50)
        return await key_bytes(redis_client)

    await loop(1)
    baseline = await settle()
    await loop(cycles)
    await project_all(redis_client, pool, settings.partitions)
    grown = await key_bytes(redis_client)
    pruned = await settle()
    await trim_streams(redis_client, pool, settings.partitions)
    streams = 0
    for p in range(settings.partitions):
        streams += int(await redis_client.memory_usage(PartitionKeys(p, 4).events, samples=0) or 0)
    print(
        f"\nreserve/cancel x{cycles}, MEMORY USAGE of every non-stream key: "
        f"baseline {baseline} B, before pruning {grown} B "
        f"({(grown - baseline) / cycles:.0f} B/cycle), after pruning {pruned} B "
        f"({(pruned - baseline) / cycles:.1f} B/cycle); streams after trim {streams} B"
    )
    assert grown - baseline > cycles * 100  # the leak this fixes was real
    # Flat: only the sale's counters (wider integers) may differ by a few bytes.
    assert pruned - baseline <= 32
