"""Fault injection with real processes: nothing accepted is lost, nothing is applied twice.

Each scenario runs real ``flashsale consume`` daemons (and the HTTP API where buyers are
involved) against real Redis and PostgreSQL, breaks something for real (SIGKILL, a stopped
PostgreSQL, a Redis killed outright, redelivery out of order), and ends with ``flashsale
replay verify`` exiting 0 and PostgreSQL holding exactly the accepted reservations.

The kill -9 of a lone projector mid-batch, and poison entries, are covered in
``test_projector.py`` and ``test_deadletter.py``. Scenarios that break a server start a
private one, so the session's shared servers are never harmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from api.cli.launcher import EmbeddedPostgres, EmbeddedRedis, _valkey_binary
from api.web.auth import issue_token
from consumers.deadletter import (
    RetryOutcome,
    list_parked,
    park,
    parked_record,
    retry_parked,
)
from consumers.projector import Projector
from consumers.replicas import ReplicaCheck
from core.durability import check_durability
from core.errors import NotReplicated
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, dead_letter_stream
from core.settings import Settings
from projections.db import open_pool
from tests.daemons import (
    caught_up,
    cli,
    cli_json,
    consumer_name,
    env_for,
    eventually,
    group_pending,
    kill_frozen_when,
    logged,
    newest_id,
    order_ids,
    running,
    sale_in_partition,
    start,
    start_consumers,
    stop_all,
    table_count,
    terminate,
    wait_exit,
    wait_started,
)
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, open_sale, pg_rows, text
from tests.http_helpers import log_events, serve

AOF_ALWAYS = ["--appendonly", "yes", "--appendfsync", "always"]


# --- helpers --------------------------------------------------------------------------------


async def place(gateway: RedisGateway, sale_id: str, users: Sequence[str]) -> list[str]:
    placed = await asyncio.gather(*(gateway.reserve(sale_id, u, 1, None) for u in users))
    return [p.reservation_id for p in placed]


def client_for(url: str) -> aioredis.Redis:
    return aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=50, timeout=10
        )
    )


async def reserve_once(
    http: aiohttp.ClientSession, sale_id: str, user: str
) -> tuple[int, dict[str, Any]]:
    """One reservation request with the buyer's own Idempotency-Key; (0, {}) if no answer."""
    headers = {
        "Authorization": f"Bearer {issue_token(JWT_SECRET, user)}",
        "Idempotency-Key": f"key-{user}",
    }
    try:
        async with http.post(
            f"/v1/sales/{sale_id}/reservations", json={"qty": 1}, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}


@dataclass
class Buyers:
    """What the buyers saw: the 202s (user -> reservation id) and everything else."""

    accepted: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)


async def buy_until(
    http: aiohttp.ClientSession,
    sale_ids: Sequence[str],
    stop: asyncio.Event,
    buyers: Buyers,
    workers: int = 4,
) -> None:
    """Buyers arrive one after another on every sale until ``stop`` (each buys once)."""
    numbers = itertools.count()

    async def worker() -> None:
        while not stop.is_set():
            n = next(numbers)
            user = f"buyer-{n}"
            status, body = await reserve_once(http, sale_ids[n % len(sale_ids)], user)
            buyers.statuses[status] += 1
            if status == 202:
                buyers.accepted[user] = body["reservation_id"]
            else:
                buyers.failed.append(user)
                buyers.bodies.append(body)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(worker() for _ in range(workers)))


def lag_in(metrics: str) -> float:
    """The sum of ``flashsale_consumer_lag`` over every group and partition."""
    return sum(
        float(v) for v in re.findall(r"^flashsale_consumer_lag\{[^}]*\} (\S+)$", metrics, re.M)
    )


async def has_logged(log_path: Path, event: str) -> bool:
    return bool(logged(log_path, event))


async def refuses_connections(database_url: str) -> bool:
    try:
        conn = await asyncpg.connect(database_url, timeout=1)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return True
    await conn.close()
    return False


# --- two projectors, one killed -------------------------------------------------------------


async def test_second_projector_takes_over_what_a_killed_one_held(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sales = [sale_in_partition(p, prefix="twin") for p in range(4)]
    for sale in sales:
        await open_sale(gateway, sale, stock=1000)
    env = env_for(settings.redis_url or "", settings.database_url or "")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a, b = await start_consumers(env, log_a, log_b)
    try:
        victim = consumer_name(a)

        killed = asyncio.Event()

        async def buy() -> list[str]:
            """Buyers arrive until the victim is killed (and 1,000 of them at least), so
            that it is caught holding a batch however fast it projects."""
            placed: list[str] = []
            for chunk in range(0, 1000, 25):
                if killed.is_set() and chunk >= 250:
                    break
                for sale in sales:
                    placed += await place(
                        gateway, sale, [f"u{j}" for j in range(chunk, chunk + 25)]
                    )
                await asyncio.sleep(0.01)
            return placed

        buying = asyncio.create_task(buy())

        # Freeze the first daemon at a moment it holds entries it has not acknowledged,
        # then kill it outright.
        async def holding() -> bool:
            return bool(await group_pending(redis_client, 4, victim))

        await kill_frozen_when(a, log_a, holding, "never caught the daemon holding a batch")
        killed.set()
        assert await wait_exit(a, 10) == -signal.SIGKILL
        orphaned = await group_pending(redis_client, 4, victim)
        assert orphaned > 0
        placed = await asyncio.wait_for(buying, 60)

        async def taken_over() -> bool:
            return not await group_pending(redis_client, 4, victim) and await caught_up(
                redis_client, pool, 4
            )

        await eventually(taken_over, 30, "the survivor did not take over", running((b, log_b)))
        assert sum(r["count"] for r in logged(log_b, "entries_reclaimed")) >= orphaned
        assert await order_ids(pool) == set(placed)
        assert await table_count(pool, "orders") == len(placed) >= 1000
        assert await redis_client.xlen(dead_letter_stream()) == 0
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(b) == 0
    finally:
        stop_all(a, b)


# --- the same events again, and out of order -----------------------------------------------


async def test_events_delivered_out_of_order_and_again_change_nothing(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sale = sale_in_partition(0, prefix="order")
    await open_sale(gateway, sale, stock=100)
    users = [f"u{i}" for i in range(30)]
    rids = await place(gateway, sale, users)
    stream = gateway.keys_for_sale(sale).events
    last_placement = await newest_id(redis_client, stream)
    for rid in rids[:10]:
        assert await gateway.confirm(rid, None)
    for rid, user in zip(rids[10:20], users[10:20], strict=True):
        assert await gateway.cancel(rid, user)
    total = 1 + 30 + 20
    # The group starts after the placements: the daemon sees the confirmations and
    # cancellations before the reservations they finish.
    await redis_client.xgroup_create(stream, CONSUMER_GROUP, id=last_placement)
    env = env_for(settings.redis_url or "", settings.database_url or "")
    log_path = tmp_path / "consume.log"
    proc = start(["consume"], env, log_path)
    try:
        await wait_started(proc, log_path)
        alive = running((proc, log_path))

        async def archived(n: int) -> bool:
            done = await table_count(pool, "events") == n
            return done and not await group_pending(redis_client, 4)

        await eventually(lambda: archived(20), 15, "terminal events not projected", alive)
        async with pool.acquire() as conn:
            early = dict(await conn.fetch("SELECT status, count(*) FROM orders GROUP BY status"))
        assert early == {"confirmed": 10, "cancelled": 10}

        async def delivered_everything() -> bool:
            info = (await redis_client.xinfo_groups(stream))[0]
            last = await newest_id(redis_client, stream)
            return text(info["last-delivered-id"]) == last and await archived(total)

        # Now everything from the start: placements arrive late, terminal events twice.
        await redis_client.xgroup_setid(stream, CONSUMER_GROUP, "0")
        await eventually(delivered_everything, 15, "log not delivered again", alive)
        out_of_order = await pg_rows(pool)
        await redis_client.xgroup_setid(stream, CONSUMER_GROUP, "0")  # and once more
        await eventually(delivered_everything, 15, "log not delivered a third time", alive)
        assert await pg_rows(pool) == out_of_order

        # The same log projected once, in order, from empty tables, gives the same rows.
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE events, orders, stock_view, checkpoints")
        await redis_client.xgroup_setid(stream, CONSUMER_GROUP, "0")
        await eventually(delivered_everything, 15, "log not projected in order", alive)
        assert await pg_rows(pool) == out_of_order
        async with pool.acquire() as conn:
            final = dict(await conn.fetch("SELECT status, count(*) FROM orders GROUP BY status"))
        assert final == {"confirmed": 10, "cancelled": 10, "pending": 10}
        assert await order_ids(pool) == set(rids)
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)


# --- PostgreSQL down for ten seconds --------------------------------------------------------


async def test_postgres_down_for_ten_seconds_under_load_then_everything_catches_up(
    gateway: RedisGateway, redis_client: aioredis.Redis, settings: Settings, tmp_path: Path
):
    postgres = EmbeddedPostgres()
    database_url = postgres.start()
    a = b = None
    pool: asyncpg.Pool | None = None
    try:
        pool = await open_pool(database_url, 4)
        sales = [sale_in_partition(p, prefix="outage") for p in range(4)]
        for sale in sales:
            await open_sale(gateway, sale, stock=100_000)
        env = env_for(
            settings.redis_url or "",
            database_url,
            FLASHSALE_CLAIM_IDLE_MS="600",
            FLASHSALE_RETENTION_INTERVAL_MS="1000",
        )
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        a, b = await start_consumers(env, log_a, log_b)
        buyers = Buyers()
        stop_buying = asyncio.Event()
        async with serve(settings, redis_client, request_seconds=10) as http:
            load = asyncio.create_task(buy_until(http, sales, stop_buying, buyers))

            async def projecting() -> bool:
                assert pool is not None
                return await table_count(pool, "orders") > 50

            await eventually(projecting, 15, "projection never started")

            os.kill(postgres.pid, signal.SIGINT)  # fast shutdown: every session ends now
            await eventually(lambda: refuses_connections(database_url), 15, "postgres still up")
            down_at = time.monotonic()
            accepted_before = len(buyers.accepted)
            await asyncio.sleep(3)

            # The backlog is visible, and nothing was given up on.
            status = await cli_json(env, "status")
            assert status["lag"] > 0 and status["dead_letters"] == 0
            metrics = await (await http.get("/metrics")).text()
            assert lag_in(metrics) > 0
            assert "flashsale_dead_letter_entries 0.0" in metrics

            # SIGTERM in the middle of it: stop reading, give the batch back, exit 0.
            assert await terminate(a) == 0, log_a.read_text()[-3000:]
            assert logged(log_a, "projector_stopped")

            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
            during_outage = len(buyers.accepted) - accepted_before
            assert during_outage > 100, buyers.statuses
            assert set(buyers.statuses) == {202}, buyers.bodies[:3]  # purchases need only Redis
            assert await refuses_connections(database_url)

            postgres.restart()
            await asyncio.sleep(1)
            stop_buying.set()
            await load

        accepted = set(buyers.accepted.values())

        async def caught_up_again() -> bool:
            assert pool is not None
            return await order_ids(pool) == accepted and not await group_pending(redis_client, 4)

        await eventually(caught_up_again, 45, "did not catch up", running((b, log_b)))
        assert logged(log_b, "projector_retry")  # it waited the outage out ...
        assert await redis_client.xlen(dead_letter_stream()) == 0  # ... and parked nothing
        # Retention trimmed the streams meanwhile (and waited the outage out too): the log
        # that verify reads below is the archive plus what the streams kept.
        assert logged(log_b, "stream_trimmed") and logged(log_b, "retention_retry")
        assert await table_count(pool, "orders") == len(accepted) == len(buyers.accepted)
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(b) == 0
    finally:
        stop_all(a, b)
        if pool is not None:
            pool.terminate()
        postgres.stop()


# --- Redis killed outright, with AOF always -------------------------------------------------


async def test_redis_with_aof_always_killed_under_load_loses_no_accepted_reservation(
    pool: asyncpg.Pool, settings: Settings, tmp_path: Path
):
    server = EmbeddedRedis(extra_args=AOF_ALWAYS)
    url = server.start()
    client = client_for(url)
    proc = None
    try:
        strict = settings.model_copy(update={"redis_url": url, "durability": "strict"})
        assert (await check_durability(client, strict)).fsyncs_every_write
        gateway = RedisGateway.from_settings(client, strict)
        sales = [sale_in_partition(p, prefix="aof") for p in range(4)]
        for sale in sales:
            await open_sale(gateway, sale, stock=100_000)
        env = env_for(
            url,
            settings.database_url or "",
            FLASHSALE_DURABILITY="strict",
            FLASHSALE_RETENTION_INTERVAL_MS="1000",
        )
        log_path = tmp_path / "consume.log"
        proc = start(["consume"], env, log_path)
        await wait_started(proc, log_path)
        buyers = Buyers()
        stop_buying = asyncio.Event()
        async with serve(strict, client, request_seconds=10) as http:
            load = asyncio.create_task(buy_until(http, sales, stop_buying, buyers))

            async def under_way() -> bool:
                return len(buyers.accepted) > 200 and await table_count(pool, "orders") > 0

            await eventually(under_way, 15, "load never got going")
            server.kill()
            await asyncio.sleep(1)
            assert buyers.failed, "no request noticed Redis was gone"
            server.restart()
            await asyncio.sleep(1.5)
            stop_buying.set()
            await load
            # A buyer without a 202 retries with the same Idempotency-Key: the reservation
            # Redis kept is answered again, one it never got is placed now.
            for user in buyers.failed:
                status, body = await reserve_once(http, sales[int(user.split("-")[1]) % 4], user)
                assert status == 202, body
                buyers.accepted[user] = body["reservation_id"]

        accepted = set(buyers.accepted.values())
        assert len(accepted) == len(buyers.accepted)
        in_redis: set[str] = set()
        for sale in sales:
            members = await client.smembers(gateway.keys_for_sale(sale).reservations(sale))
            in_redis |= {text(m) for m in members}
        assert in_redis == accepted  # every 202 survived, and nothing without one exists

        async def caught_up_again() -> bool:
            return await order_ids(pool) == accepted and not await group_pending(client, 4)

        await eventually(caught_up_again, 45, "did not catch up", running((proc, log_path)))
        assert await client.xlen(dead_letter_stream()) == 0
        rc, out = await cli(env, "replay", "verify")
        assert rc == 0, out
        assert await terminate(proc) == 0
    finally:
        stop_all(proc)
        await client.aclose()
        server.stop()


# --- durability settings --------------------------------------------------------------------


async def test_strict_durability_refuses_to_start_unless_redis_fsyncs_every_write(
    settings: Settings, tmp_path: Path
):
    for extra, accepted in (
        ([], False),
        (["--appendonly", "yes", "--appendfsync", "everysec"], False),
        (AOF_ALWAYS, True),
    ):
        server = EmbeddedRedis(extra_args=extra)
        url = server.start()
        try:
            env = env_for(
                url, settings.database_url or "", FLASHSALE_DURABILITY="strict", FLASHSALE_PORT="0"
            )
            if not accepted:
                rc, out = await cli(env, "serve")
                assert rc == 2, out
                assert "FLASHSALE_DURABILITY=strict" in out
                assert "appendonly=yes, appendfsync=always" in out
                continue
            log_path = tmp_path / "serve.log"
            proc = start(["serve"], env, log_path)
            try:
                listening = functools.partial(has_logged, log_path, "api_listening")
                await eventually(listening, 30, "serve did not start", running((proc, log_path)))
                assert logged(log_path, "durability_checked")[0]["appendfsync"] == "always"
                assert await terminate(proc) == 0
            finally:
                stop_all(proc)
        finally:
            server.stop()


# --- FLASHSALE_WAIT_REPLICAS: a primary with one replica -------------------------------------


@dataclass
class PrimaryAndReplica:
    """A private primary with one replica, and a client of the primary."""

    primary: EmbeddedRedis
    replica: EmbeddedRedis
    url: str
    replica_url: str
    client: aioredis.Redis

    async def replicas_online(self, n: int) -> bool:
        """The primary sees exactly ``n`` replicas, all online."""
        info = await self.client.info("replication")
        online = [k for k in info if k.startswith("slave") and info[k]["state"] == "online"]
        return int(info["connected_slaves"]) == n and len(online) == n

    async def replica_acknowledges(self) -> bool:
        """The replica acknowledges a write of the primary within 200 ms."""
        async with self.client.client() as conn:  # WAIT covers its own connection's writes
            await conn.set("probe", "1")
            return int(await conn.wait(1, 200)) == 1

    async def on_replica(self, key: str) -> dict[str, str]:
        """The hash ``key`` as the replica holds it, read on a fresh connection (those of
        a replica killed since died with it)."""
        async with aioredis.Redis.from_url(self.replica_url, decode_responses=True) as replica:
            held: dict[Any, Any] = await replica.hgetall(key)
            return {str(k): str(v) for k, v in held.items()}

    @contextlib.asynccontextmanager
    async def replica_frozen(self) -> AsyncIterator[None]:
        """The replica stopped (SIGSTOP) while inside: still connected to the primary, it
        acknowledges nothing more."""
        async with aioredis.Redis.from_url(self.replica_url) as replica:
            pid = int((await replica.info("server"))["process_id"])
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def primary_and_replica(binary: Path | None = None) -> AsyncIterator[PrimaryAndReplica]:
    """A primary and its replica (private servers, of ``binary``, else the launcher's
    choice), once the replica acknowledges."""
    primary = EmbeddedRedis(extra_args=["--repl-diskless-sync-delay", "0"], binary=binary)
    url = primary.start()
    replica = EmbeddedRedis(
        extra_args=["--replicaof", "127.0.0.1", str(primary.port)], binary=binary
    )
    try:
        both = PrimaryAndReplica(primary, replica, url, replica.start(), client_for(url))
        try:
            await eventually(both.replica_acknowledges, 15, "replica did not sync")
            yield both
        finally:
            await both.client.aclose()
    finally:
        replica.stop()
        primary.stop()


def waiting_for_one_replica(settings: Settings, redis: PrimaryAndReplica) -> Settings:
    return settings.model_copy(
        update={"redis_url": redis.url, "wait_replicas": 1, "wait_timeout_ms": 300}
    )


async def change_once(
    http: aiohttp.ClientSession, action: str, user: str, reservation_id: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The buyer confirms or cancels (``action``) a reservation: status, body and headers."""
    headers = {"Authorization": f"Bearer {issue_token(JWT_SECRET, user)}"}
    path = f"/v1/reservations/{reservation_id}/{action}"
    async with http.post(path, headers=headers) as response:
        body = await response.json(content_type=None)
        return response.status, body, dict(response.headers)


async def test_wait_replicas_answers_503_until_a_replica_has_the_reservation(settings: Settings):
    async with primary_and_replica() as redis:
        waiting = waiting_for_one_replica(settings, redis)
        gateway = RedisGateway.from_settings(redis.client, waiting)
        await open_sale(gateway, "replicated", stock=10)
        keys = gateway.keys_for_sale("replicated")

        async with serve(waiting, redis.client, request_seconds=10) as http:
            status, body = await reserve_once(http, "replicated", "alice")
            assert status == 202, body
            # Acknowledged by the replica before the 202: it is there already.
            assert await redis.on_replica(keys.reservation(body["reservation_id"]))

            redis.replica.kill()
            await eventually(lambda: redis.replicas_online(0), 15, "primary did not see it go")
            status, body = await reserve_once(http, "replicated", "bob")
            assert status == 503 and body["code"] == "not_replicated", body
            held = body["reservation_id"]
            assert held in body["detail"] and "0 of 1 replicas" in body["detail"]
            # The reservation stands in Redis even so, and its buyer can see it.
            view = await gateway.get_reservation(held)
            assert view is not None and view.status == "pending" and view.user_id == "bob"
            status, body = await reserve_once(http, "replicated", "bob")  # a retry, still alone
            assert (status, body["reservation_id"]) == (503, held)

            redis.replica.restart()
            await eventually(redis.replica_acknowledges, 15, "replica did not come back")
            status, body = await reserve_once(http, "replicated", "bob")
            assert (status, body["reservation_id"]) == (202, held)  # the same one, now safe
            assert await redis.on_replica(keys.reservation(held))
        sale = await gateway.get_sale("replicated")
        assert sale is not None and (sale.remaining, sale.held) == (8, 2)


@pytest.mark.parametrize("action", ["confirm", "cancel"])
async def test_wait_replicas_answers_503_until_a_replica_has_the_payment_or_cancellation(
    settings: Settings, action: str
):
    """A 200 to a payment (or a cancellation) means the replica has it; without the replica,
    503 not_replicated while it stands on the primary, and the same request again answers
    503 until the replica is back, then 200 (unchanged)."""
    ended = "confirmed" if action == "confirm" else "cancelled"
    async with primary_and_replica() as redis:
        waiting = waiting_for_one_replica(settings, redis)
        gateway = RedisGateway.from_settings(redis.client, waiting)
        await open_sale(gateway, "replicated", stock=10)
        keys = gateway.keys_for_sale("replicated")

        async with serve(waiting, redis.client, request_seconds=10) as http:
            rids = {}
            for user in ("alice", "bob"):
                status, body = await reserve_once(http, "replicated", user)
                assert status == 202, body
                rids[user] = body["reservation_id"]
            status, body, _ = await change_once(http, action, "alice", rids["alice"])
            assert (status, body["status"], body["changed"]) == (200, ended, True), body
            # Acknowledged by the replica before the 200: it has the new status already.
            assert (await redis.on_replica(keys.reservation(rids["alice"])))["status"] == ended

            redis.replica.kill()
            await eventually(lambda: redis.replicas_online(0), 15, "primary did not see it go")
            held = rids["bob"]
            status, body, headers = await change_once(http, action, "bob", held)
            assert (status, body["code"], body["reservation_id"]) == (503, "not_replicated", held)
            assert held in body["detail"] and "0 of 1 replicas" in body["detail"]
            assert "recorded" in body["detail"]
            assert "repeating the same request is safe" in body["detail"]
            assert headers["Retry-After"] == "1"
            assert headers["Location"] == f"/v1/reservations/{held}"
            # It stands on the primary even so, and its buyer sees it.
            view = await gateway.get_reservation(held)
            assert view is not None and view.status == ended
            # A retry while still alone: 503 again, not 200 and not reservation_closed.
            status, body, _ = await change_once(http, action, "bob", held)
            assert (status, body["code"]) == (503, "not_replicated"), body

            redis.replica.restart()
            await eventually(redis.replica_acknowledges, 15, "replica did not come back")
            status, body, _ = await change_once(http, action, "bob", held)
            assert (status, body["status"], body["changed"]) == (200, ended, False), body
            assert (await redis.on_replica(keys.reservation(held)))["status"] == ended
        sale = await gateway.get_sale("replicated")
        assert sale is not None
        if action == "confirm":
            assert (sale.remaining, sale.held, sale.confirmed) == (8, 0, 2)
        else:
            assert (sale.remaining, sale.held, sale.released) == (10, 0, 2)


async def test_the_projector_writes_to_postgres_only_what_the_replica_holds(
    settings: Settings, pool: asyncpg.Pool
):
    """Under FLASHSALE_WAIT_REPLICAS a placement the replica lacks is answered 503
    not_replicated, and the projector must not write it to PostgreSQL either: a failover
    to that replica would leave an order (and stock held) that the new primary, and so the
    log, never had. While the replica is frozen (connected, acknowledging nothing) the
    projector keeps the batch in hand, acknowledging nothing; once the replica catches up,
    the batch goes in, once."""
    async with primary_and_replica() as redis:
        waiting = waiting_for_one_replica(settings, redis)
        gateway = RedisGateway.from_settings(redis.client, waiting)
        await open_sale(gateway, "replicated", stock=10)
        ann = (await gateway.reserve("replicated", "ann", 1, None)).reservation_id
        projector = Projector(
            redis.client,
            pool,
            waiting.partitions,
            consumer="checked",
            block_ms=50,
            wait_replicas=1,
            wait_timeout_ms=waiting.wait_timeout_ms,
        )
        await projector.ensure_groups()
        stop = asyncio.Event()
        task = asyncio.create_task(projector.run(stop))
        try:

            async def projected(*rids: str) -> bool:
                return await order_ids(pool) == set(rids)

            await eventually(lambda: projected(ann), 15, "the replicated placement")
            async with redis.replica_frozen():
                with pytest.raises(NotReplicated, match="0 of 1 replicas") as refused:
                    await gateway.reserve("replicated", "bob", 1, None)
                bob = refused.value.reservation_id
                await asyncio.sleep(2)  # the projector tries, and waits, several times
                assert await projected(ann)
                assert await table_count(pool, "events") == 2  # the sale, ann's placement
                assert await group_pending(redis.client, waiting.partitions) == 1  # in hand
            await eventually(redis.replica_acknowledges, 15, "replica did not catch up")
            await eventually(lambda: projected(ann, bob), 15, "bob's placement after all")
            assert await group_pending(redis.client, waiting.partitions) == 0
        finally:
            stop.set()
            await task
        assert await table_count(pool, "events") == 3


async def test_a_parked_entry_is_redriven_only_once_the_replica_holds_its_partition(
    settings: Settings, pool: asyncpg.Pool
):
    """``flashsale dlq retry`` under FLASHSALE_WAIT_REPLICAS keeps the projector's rule: an
    entry whose partition the replica is behind on stays parked (``failed``, saying why)
    and reaches PostgreSQL once the replica catches up."""
    async with primary_and_replica() as redis:
        waiting = waiting_for_one_replica(settings, redis)
        gateway = RedisGateway.from_settings(redis.client, waiting)
        await open_sale(gateway, "replicated", stock=10)
        rid = (await gateway.reserve("replicated", "ann", 1, None)).reservation_id
        stream = gateway.keys_for_sale("replicated").events
        entries: Any = await redis.client.xrange(stream)
        entry_id, fields = entries[-1]  # the placement
        record = parked_record(
            stream=stream,
            stream_id=text(entry_id),
            group=CONSUMER_GROUP,
            consumer="gone",
            error="parked by the test",
            deliveries=5,
            fields={text(k): text(v) for k, v in fields.items()},
        )
        await park(redis.client, record)
        replicas = ReplicaCheck(redis.client, waiting.partitions, 1, waiting.wait_timeout_ms)

        async def redrive() -> RetryOutcome:
            [outcome] = await retry_parked(
                redis.client, pool, waiting.partitions, replicas=replicas
            )
            return outcome

        async with redis.replica_frozen():
            outcome = await redrive()
            assert outcome.result == "failed", outcome
            assert outcome.detail.startswith("ReplicasBehind: 0 of 1 replicas"), outcome
            assert len(await list_parked(redis.client)) == 1
            assert await order_ids(pool) == set()
        await eventually(redis.replica_acknowledges, 15, "replica did not catch up")
        assert (await redrive()).result == "projected"
        assert await order_ids(pool) == {rid}
        assert await list_parked(redis.client) == []


@pytest.mark.parametrize("action", ["reserve", "confirm", "cancel"])
async def test_a_repeat_that_finds_the_work_done_waits_for_the_replica_to_have_it(
    settings: Settings, action: str
):
    """WAIT covers only the writes of its own connection. A repeat that finds the work done
    (the Idempotency-Key's placement, the reservation already confirmed or cancelled)
    writes a value again as it is, so that a client whose connections wrote nothing still
    waits for a replica that lacks the first call's write (frozen: connected, acknowledging
    nothing); without that rewrite, WAIT would count that replica at once and the repeat
    would answer as if it were safe.

    On Valkey (the wheel's): it moves a connection's WAIT offset only when the connection
    writes. Redis 7.0 moves it with every command, written or not, so there the repeat
    waits even without the rewrite (the test passes there either way).
    """
    ended = {"reserve": "pending", "confirm": "confirmed", "cancel": "cancelled"}[action]
    async with primary_and_replica(_valkey_binary()) as redis:

        def gateway_on(client: aioredis.Redis) -> RedisGateway:
            return RedisGateway.from_settings(client, waiting_for_one_replica(settings, redis))

        async def act(gateway: RedisGateway) -> bool:
            """The call, as its buyer makes it again: True when it did the work."""
            if action == "reserve":
                placed = await gateway.reserve("replicated", "ann", 1, "key-1")
                assert placed.reservation_id == rid or not rid
                return not placed.replayed
            change = gateway.confirm if action == "confirm" else gateway.cancel
            return await change(rid, "ann")

        gateway = gateway_on(redis.client)
        await open_sale(gateway, "replicated", stock=10)
        rid = ""
        if action != "reserve":
            rid = (await gateway.reserve("replicated", "ann", 1, None)).reservation_id
        async with redis.replica_frozen():
            with pytest.raises(NotReplicated, match="0 of 1 replicas") as first:
                await act(gateway)
            rid = first.value.reservation_id
            async with client_for(redis.url) as fresh:  # connections that never wrote
                with pytest.raises(NotReplicated, match="0 of 1 replicas"):
                    await act(gateway_on(fresh))
        await eventually(redis.replica_acknowledges, 15, "replica did not catch up")
        async with client_for(redis.url) as fresh:
            assert await act(gateway_on(fresh)) is False
        keys = gateway.keys_for_sale("replicated")
        assert (await redis.on_replica(keys.reservation(rid)))["status"] == ended


@pytest.mark.parametrize("action", ["create", "restock", "close"])
async def test_an_admin_write_to_a_sale_answers_503_until_a_replica_has_it(
    settings: Settings, action: str
):
    """Under FLASHSALE_WAIT_REPLICAS, a 201 or 200 to an admin's write to a sale means the
    replica has it. With the replica frozen (connected, acknowledging nothing): 503
    not_replicated naming the sale while the write stands on the primary, and the same
    request again, from connections that never wrote, 503 again (the write a repeat finds
    done is covered by the partition's mark, not by its own connection's writes); once the
    replica catches up, the answer, with nothing done twice.

    On Valkey (the wheel's), which moves a connection's WAIT offset only when it writes:
    without the mark, the repeat on fresh connections would answer at once."""
    path, body, done_event = {
        "create": ("/v1/sales", {"sale_id": "replicated", "stock": 10}, "SaleCreated"),
        "restock": ("/v1/sales/replicated/stock", {"delta": 5}, "StockAdjusted"),
        "close": ("/v1/sales/replicated/close", None, "SaleClosed"),
    }[action]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": "admin-1"}
    async with primary_and_replica(_valkey_binary()) as redis:
        waiting = waiting_for_one_replica(settings, redis)
        gateway = RedisGateway.from_settings(redis.client, waiting)
        if action != "create":
            await open_sale(gateway, "replicated", stock=10)
        keys = gateway.keys_for_sale("replicated")

        async def post(client: aioredis.Redis) -> tuple[int, dict[str, Any], dict[str, str]]:
            async with (
                serve(waiting, client, request_seconds=10) as http,
                http.post(path, json=body, headers=admin) as response,
            ):
                answer = await response.json(content_type=None)
                return response.status, answer, dict(response.headers)

        async with redis.replica_frozen():
            status, answer, headers = await post(redis.client)
            assert (status, answer["code"]) == (503, "not_replicated"), answer
            assert answer["sale_id"] == "replicated" and "0 of 1 replicas" in answer["detail"]
            assert headers["Location"] == "/v1/sales/replicated"
            assert headers["Retry-After"] == "1"
            async with client_for(redis.url) as fresh:  # connections that never wrote
                status, answer, _ = await post(fresh)
                assert (status, answer["code"]) == (503, "not_replicated"), answer
        await eventually(redis.replica_acknowledges, 15, "replica did not catch up")
        async with client_for(redis.url) as fresh:
            status, answer, _ = await post(fresh)
        assert status == (201 if action == "create" else 200), answer
        assert answer.get("changed", False) is False
        on_replica = await redis.on_replica(keys.sale("replicated"))
        assert (on_replica["stock"], on_replica["closed"]) == {
            "create": ("10", "0"),
            "restock": ("15", "0"),
            "close": ("10", "1"),
        }[action]
        kinds = Counter(type(event).__name__ for event in await log_events(gateway))
        assert kinds[done_event] == 1, kinds
