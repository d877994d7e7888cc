"""The projector against real Redis and PostgreSQL: exactly-once effect under at-least-once
delivery, crashes before and after the commit, duplicates, reordering, poison entries, and a
real daemon process killed mid-batch."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from consumers.projector import Projector
from core.events import (
    AnyEvent,
    ReservationCancelled,
    ReservationConfirmed,
    ReservationExpired,
    ReservationPlaced,
    parse_event,
)
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, dead_letter_stream, partition_of
from core.settings import Settings
from projections.batch import project
from projections.entries import LogEntry, parse_stream_id
from projections.fold import fold
from tests.conftest import ProjectorFactory
from tests.daemons import (
    cli,
    env_of,
    group_pending,
    kill_frozen_when,
    start,
    table_count,
    wait_exit,
)
from tests.helpers import open_sale, pg_rows, text

FLASHSALE = Path(sys.executable).parent / "flashsale"

COUNTERS = ("stock", "remaining", "held", "confirmed", "released")


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def projector(make_projector: ProjectorFactory, settings: Settings) -> ProjectorFactory:
    """Projectors that poll and claim at the test settings' pace unless told otherwise."""

    def make(consumer: str, **options: Any) -> Projector:
        options.setdefault("block_ms", settings.consumer_block_ms)
        options.setdefault("claim_idle_ms", settings.claim_idle_ms)
        return make_projector(consumer, **options)

    return make


async def drain(p: Projector) -> int:
    """Read and handle new entries until there are none; return events new to PostgreSQL."""
    new = 0
    while batch := await p.read_new(block_ms=10):
        new += await p.handle(batch)
    return new


async def place(
    gateway: RedisGateway, sale_id: str, users: Sequence[str], qty: int = 1
) -> list[str]:
    placed = await asyncio.gather(*(gateway.reserve(sale_id, u, qty, None) for u in users))
    return [p.reservation_id for p in placed]


async def log_entries(gateway: RedisGateway) -> list[LogEntry]:
    """Every entry of every partition stream, parsed, in stream order per partition."""
    entries: list[LogEntry] = []
    for partition in range(gateway.partitions):
        async for stream_id, fields in gateway.read_stream(partition):
            entries.append(LogEntry(partition, stream_id, parse_event(fields["event"])))
    return entries


async def orders(pool: asyncpg.Pool) -> dict[str, tuple[str, str, int, str]]:
    """reservation_id -> (sale_id, user_id, qty, status)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT reservation_id, sale_id, user_id, qty, status FROM orders")
    return {r["reservation_id"]: (r["sale_id"], r["user_id"], r["qty"], r["status"]) for r in rows}


async def stock_view(pool: asyncpg.Pool) -> dict[str, dict[str, int]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM stock_view")
    return {r["sale_id"]: {c: r[c] for c in COUNTERS} for r in rows}


async def redis_counters(gateway: RedisGateway, sale_id: str) -> dict[str, int]:
    sale = await gateway.get_sale(sale_id)
    assert sale is not None
    return {c: getattr(sale, c) for c in COUNTERS}


async def checkpoints(pool: asyncpg.Pool) -> dict[int, str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT partition, stream_id FROM checkpoints WHERE consumer_group = $1",
            CONSUMER_GROUP,
        )
    return {r["partition"]: r["stream_id"] for r in rows}


async def assert_projection_matches_redis(
    gateway: RedisGateway, pool: asyncpg.Pool, sale_ids: Sequence[str]
) -> None:
    """Orders are exactly the placed reservations, stock_view equals Redis, one row per event."""
    entries = await log_entries(gateway)
    placed = {
        e.event.reservation_id: e.event for e in entries if isinstance(e.event, ReservationPlaced)
    }
    got = await orders(pool)
    assert set(got) == set(placed)
    for rid, event in placed.items():
        assert got[rid] == (event.sale_id, event.user_id, event.qty, "pending")
    views = await stock_view(pool)
    assert set(views) == set(sale_ids)
    for sale_id in sale_ids:
        assert views[sale_id] == await redis_counters(gateway, sale_id), sale_id
    assert await table_count(pool, "events") == len(entries)
    async with pool.acquire() as conn:
        archived = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM events")}
    assert archived == {e.event.event_id for e in entries}


def sale_ids_covering(partitions: int, per_partition: int, prefix: str) -> list[str]:
    """Sale ids that put ``per_partition`` sales in every partition."""
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    k = 0
    while any(len(v) < per_partition for v in chosen.values()):
        name = f"{prefix}-{k}"
        bucket = chosen[partition_of(name, partitions)]
        if len(bucket) < per_partition:
            bucket.append(name)
        k += 1
    return [s for p in range(partitions) for s in chosen[p]]


# --- 1. happy path --------------------------------------------------------------------------


async def test_run_projects_every_reservation_once(
    projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "sale-1", stock=100, per_user_limit=2)
    users = [f"user-{i}" for i in range(40)]
    await place(gateway, "sale-1", users[:20], qty=2)
    await place(gateway, "sale-1", users[20:], qty=1)

    p = projector("happy", batch=7)
    await p.ensure_groups()
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    deadline = time.monotonic() + 15
    while await table_count(pool, "orders") < len(users) or await group_pending(redis_client, 4):
        assert time.monotonic() < deadline, "projector did not catch up"
        assert not task.done(), task
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)

    got = await orders(pool)
    assert len(got) == 40
    assert {v[1] for v in got.values()} == set(users)
    assert all(v[0] == "sale-1" and v[3] == "pending" for v in got.values())
    assert sorted(v[2] for v in got.values()) == [1] * 20 + [2] * 20
    views = await stock_view(pool)
    assert views["sale-1"] == await redis_counters(gateway, "sale-1")
    assert views["sale-1"] == {
        "stock": 100,
        "remaining": 40,
        "held": 60,
        "confirmed": 0,
        "released": 0,
    }
    assert await table_count(pool, "events") == len(users) + 1
    await assert_projection_matches_redis(gateway, pool, ["sale-1"])
    partition = partition_of("sale-1", 4)
    last = [e for e in await log_entries(gateway) if e.partition == partition][-1].stream_id
    assert await checkpoints(pool) == {partition: last}
    assert p.projected == len(users) + 1
    assert await group_pending(redis_client, 4) == 0


# --- 2. crash before the commit -------------------------------------------------------------


async def test_entries_of_a_consumer_that_died_before_commit_are_reclaimed(
    projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    sale_ids = sale_ids_covering(4, 1, "crash")
    for sale_id in sale_ids:
        await open_sale(gateway, sale_id, stock=50)
        await place(gateway, sale_id, [f"u{i}" for i in range(10)])

    dead = projector("dead", batch=1000)
    await dead.ensure_groups()
    taken = await dead.read_new()
    assert len(taken) == 4 * 11  # read, then the process "dies" before projecting
    assert await group_pending(redis_client, 4) == len(taken)

    heir = projector("heir", batch=1000, claim_idle_ms=200)
    assert await heir.read_new(block_ms=10) == []  # nothing new: it is all pending on "dead"
    assert await heir.claim_stale() == []  # not idle long enough: a live consumer keeps its work
    await asyncio.sleep(0.3)
    claimed = await heir.claim_stale()
    assert {(d.partition, d.stream_id) for d in claimed} == {
        (d.partition, d.stream_id) for d in taken
    }
    # Delivered before: written the way that skips what the archive holds, at once.
    assert not heir.prepare(taken).batch.repeated and heir.prepare(claimed).batch.repeated
    assert await heir.handle(claimed) == len(taken)

    assert await group_pending(redis_client, 4) == 0
    assert await heir.claim_stale() == [] and await drain(heir) == 0
    await assert_projection_matches_redis(gateway, pool, sale_ids)


async def test_run_reclaims_more_than_one_batch_of_a_dead_consumer_without_waiting(
    projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    sale_ids = sale_ids_covering(4, 1, "backlog")
    for sale_id in sale_ids:
        await open_sale(gateway, sale_id, stock=50)
        await place(gateway, sale_id, [f"u{i}" for i in range(30)])

    dead = projector("dead", batch=20)
    await dead.ensure_groups()
    orphaned = await dead.read_new()  # XREADGROUP COUNT is per stream: 4 x 20 entries
    assert len(orphaned) == 80

    heir = projector("heir", batch=20, claim_idle_ms=0)
    stop = asyncio.Event()
    task = asyncio.create_task(heir.run(stop, claim_every=5.0))
    deadline = time.monotonic() + 3  # well before the next scheduled claim
    while await group_pending(redis_client, 4) or await table_count(pool, "orders") < 4 * 30:
        assert not task.done(), task
        assert time.monotonic() < deadline, "orphaned entries only come back one batch per claim"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    await assert_projection_matches_redis(gateway, pool, sale_ids)


# --- 3. crash after the commit, before XACK -------------------------------------------------


async def test_batch_committed_but_not_acked_is_not_applied_twice(
    projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    await open_sale(gateway, "sale-1", stock=30, per_user_limit=3)
    await place(gateway, "sale-1", [f"u{i}" for i in range(12)], qty=2)

    dead = projector("dead", batch=1000)
    await dead.ensure_groups()
    taken = await dead.read_new()
    entries = [LogEntry(d.partition, d.stream_id, parse_event(d.fields["event"])) for d in taken]
    async with pool.acquire() as conn:
        assert await project(conn, CONSUMER_GROUP, entries) == 13
    # ... and the process dies here, before XACK.
    before = await pg_rows(pool)
    assert await group_pending(redis_client, 4) == 13

    heir = projector("heir", batch=1000, claim_idle_ms=0)
    claimed = await heir.claim_stale()
    assert len(claimed) == 13
    assert await heir.handle(claimed) == 0  # every event was already archived and applied

    assert await pg_rows(pool) == before
    assert await group_pending(redis_client, 4) == 0
    await assert_projection_matches_redis(gateway, pool, ["sale-1"])
    assert (await stock_view(pool))["sale-1"] == {
        "stock": 30,
        "remaining": 6,
        "held": 24,
        "confirmed": 0,
        "released": 0,
    }


# --- 4. duplicates and reordering -----------------------------------------------------------


def _terminal_entries(entries: list[LogEntry]) -> list[LogEntry]:
    """Hand-made terminal events for some placed reservations, after the stream's end."""
    placed = [e for e in entries if isinstance(e.event, ReservationPlaced)]
    kinds: list[type[ReservationConfirmed | ReservationCancelled | ReservationExpired]] = [
        ReservationConfirmed,
        ReservationCancelled,
        ReservationExpired,
    ]
    made: list[LogEntry] = []
    last: dict[int, tuple[int, int]] = {}
    for e in entries:
        last[e.partition] = max(last.get(e.partition, (0, 0)), e.position)
    for i, entry in enumerate(placed[:9]):
        event = entry.event
        assert isinstance(event, ReservationPlaced)
        ms, seq = last[entry.partition]
        last[entry.partition] = (ms, seq + 1)
        terminal: AnyEvent = kinds[i % 3](
            event_id=f"terminal-{i}",
            sale_id=event.sale_id,
            occurred_at=event.occurred_at,
            reservation_id=event.reservation_id,
            user_id=event.user_id,
            qty=event.qty,
        )
        made.append(LogEntry(entry.partition, f"{ms}-{seq + 1}", terminal))
    return made


def _scenarios(
    entries: list[LogEntry], terminals: list[LogEntry]
) -> dict[str, list[list[LogEntry]]]:
    everything = entries + terminals
    rng = random.Random(20240601)
    shuffled = everything[:]
    rng.shuffle(shuffled)
    chunks: list[list[LogEntry]] = []
    rest = shuffled[:]
    while rest:
        size = rng.randint(1, 6)
        chunks.append(rest[:size])
        rest = rest[size:]
    return {
        "twice in order": [everything, everything],
        "reversed": [everything[::-1]],
        "reversed one at a time": [[e] for e in everything[::-1]],
        "shuffled in random batches": chunks,
        "shuffled batches then all again": [*chunks, shuffled],
        "each event twice in one batch": [everything + everything[::-1]],
        "duplicates across batches": [
            everything[:10],
            everything[5:20],
            everything[15:],
            everything,
        ],
        "terminals before their placements": [terminals, entries],
        "terminals first in the same batch": [terminals + entries],
        "terminals first, then everything": [terminals, entries, everything],
    }


async def test_duplicates_and_reordering_converge_to_the_in_order_projection(
    gateway: RedisGateway, pool: asyncpg.Pool
):
    await open_sale(gateway, "sale-a", stock=20, per_user_limit=2)
    await open_sale(gateway, "sale-b", stock=8, per_user_limit=1)
    for i in range(6):
        await gateway.reserve("sale-a", f"u{i}", 1 + i % 2, None)
        await gateway.reserve("sale-b", f"u{i}", 1, None)
    entries = await log_entries(gateway)
    terminals = _terminal_entries(entries)
    everything = entries + terminals

    async def reset() -> None:
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE events, orders, stock_view, checkpoints")

    async with pool.acquire() as conn:
        assert await project(conn, CONSUMER_GROUP, everything) == len(everything)
    baseline = await pg_rows(pool)

    # The baseline itself is right: it agrees with the fold of the log.
    folded = fold(e.event for e in everything)
    views = await stock_view(pool)
    for sale_id, state in folded.items():
        assert views[sale_id] == state.counters()
        assert state.invariant_violations() == []
    got = await orders(pool)
    for state in folded.values():
        for rid, r in state.reservations.items():
            assert got[rid] == (r.sale_id, r.user_id, r.qty, r.status)
    assert {v[3] for v in got.values()} == {"pending", "confirmed", "cancelled", "expired"}

    for name, batches in _scenarios(entries, terminals).items():
        await reset()
        new = 0
        async with pool.acquire() as conn:
            for batch in batches:
                new += await project(conn, CONSUMER_GROUP, batch)
        assert new == len(everything), name
        assert await pg_rows(pool) == baseline, name


# --- 5. poison entries ----------------------------------------------------------------------


def _event_json(**fields: Any) -> str:
    base: dict[str, Any] = {
        "type": "SaleClosed",
        "v": 1,
        "event_id": "poison",
        "sale_id": "sale-1",
        "occurred_at": 1_700_000_000_000,
    }
    base.update(fields)
    return json.dumps(base)


def _refused_by_postgres(event_id: str, **fields: Any) -> str:
    """A well-formed ReservationPlaced that PostgreSQL cannot store."""
    base: dict[str, Any] = {
        "type": "ReservationPlaced",
        "event_id": event_id,
        "sale_id": "forged",
        "reservation_id": f"0-{event_id}",
        "user_id": "mallory",
        "qty": 1,
        "expires_at": 1_700_000_600_000,
    }
    base.update(fields)
    return _event_json(**base)


POISON: dict[str, dict[str, str]] = {
    "not json": {"event": "not json"},
    "missing fields": {"event": json.dumps({"type": "ReservationPlaced", "sale_id": "sale-1"})},
    "no event field": {"payload": "{}"},
    "json but not an object": {"event": "[1, 2]"},
    "unknown type": {"event": _event_json(type="SaleExploded")},
    "unknown old version": {"event": _event_json(v=0)},
    "null version": {"event": _event_json(v=None)},
    "time out of range": {"event": _event_json(occurred_at=10**20)},
    "qty beyond int4": {"event": _refused_by_postgres("big-qty", qty=2**31)},
    "NUL in a string": {"event": _refused_by_postgres("nul-user", user_id="mal\u0000lory")},
}


@pytest.mark.parametrize("use_run", [False, True], ids=["handle", "run"])
async def test_poison_entries_are_dead_lettered_and_the_rest_projected(
    projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    use_run: bool,
):
    await open_sale(gateway, "sale-1", stock=50)
    stream = gateway.keys_for_sale("sale-1").events
    before = await place(gateway, "sale-1", [f"early-{i}" for i in range(5)])
    poison_ids = {}
    for name, fields in POISON.items():
        entry: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
        poison_ids[text(await redis_client.xadd(stream, entry))] = name
        await place(gateway, "sale-1", [f"between-{name}"])
    after = await place(gateway, "sale-1", [f"late-{i}" for i in range(5)])
    assert before and after

    p = projector("p", batch=4)
    await p.ensure_groups()
    if use_run:
        stop = asyncio.Event()
        task = asyncio.create_task(p.run(stop))
        deadline = time.monotonic() + 15
        while p.dead_lettered < len(POISON) or await group_pending(redis_client, 4):
            assert not task.done(), task
            assert time.monotonic() < deadline, "projector stuck on a poison entry"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)
    else:
        await drain(p)

    assert p.dead_lettered == len(POISON)
    assert await group_pending(redis_client, 4) == 0
    parked = await redis_client.xrange(dead_letter_stream()) or []
    assert len(parked) == len(POISON)
    by_id = {}
    for _, raw in parked:
        assert raw is not None
        fields = {text(k): text(v) for k, v in raw.items()}
        by_id[fields["stream_id"]] = fields
    assert set(by_id) == set(poison_ids)
    for stream_id, name in poison_ids.items():
        fields = by_id[stream_id]
        assert fields["stream"] == stream and fields["group"] == CONSUMER_GROUP
        assert fields["error"], name
        original = {f"field:{k}": v for k, v in POISON[name].items()}
        assert {k: fields[k] for k in original} == original, name

    # Every good entry, before, between and after the poison, is projected.
    good = [e for e in await log_entries_skipping(gateway, set(poison_ids))]
    got = await orders(pool)
    placed = {e.event.reservation_id for e in good if isinstance(e.event, ReservationPlaced)}
    assert set(got) == placed and len(got) == 5 + len(POISON) + 5
    assert (await stock_view(pool))["sale-1"] == await redis_counters(gateway, "sale-1")
    assert await table_count(pool, "events") == len(good)


async def log_entries_skipping(gateway: RedisGateway, skip: set[str]) -> list[LogEntry]:
    entries: list[LogEntry] = []
    for partition in range(gateway.partitions):
        async for stream_id, fields in gateway.read_stream(partition):
            if stream_id not in skip:
                entries.append(LogEntry(partition, stream_id, parse_event(fields["event"])))
    return entries


# --- 6. a real daemon killed with SIGKILL mid-batch -----------------------------------------


async def test_consumer_killed_mid_batch_and_restarted_projects_everything_once(
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
):
    sale_ids = sale_ids_covering(4, 2, "mega")
    for sale_id in sale_ids:
        await open_sale(gateway, sale_id, stock=600, per_user_limit=1)
    per_sale = 500
    total = per_sale * len(sale_ids)
    log_path = tmp_path / "consume.log"
    first = start(["consume"], env_of(settings), log_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 20
        while True:  # the daemon is up once its groups exist on every stream
            groups = [
                await redis_client.xinfo_groups(s) if await redis_client.exists(s) else []
                for s in gateway.stream_names()
            ]
            if all(groups):
                break
            assert first.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.05)

        async def buy() -> list[str]:
            placed: list[str] = []
            for chunk in range(0, per_sale, 25):
                for i, sale_id in enumerate(sale_ids):
                    users = [f"user-{(i * 137 + j) % 1500}" for j in range(chunk, chunk + 25)]
                    placed += await place(gateway, sale_id, users)
                await asyncio.sleep(0.01)
            return placed

        buying = asyncio.create_task(buy())

        # Freeze the daemon while it holds a batch it has read but not acknowledged, with
        # some orders already committed and not all: then kill it outright.
        async def mid_batch() -> bool:
            in_hand = await group_pending(redis_client, 4)
            projected = await table_count(pool, "orders")
            return bool(in_hand) and 0 < projected < total

        await kill_frozen_when(first, log_path, mid_batch, "never caught the daemon mid-batch")
        assert await wait_exit(first, 10) == -signal.SIGKILL
        orphaned = await group_pending(redis_client, 4)
        assert orphaned > 0

        second = start(["consume"], env_of(settings), log_path)
        placed = await asyncio.wait_for(buying, 60)
        assert len(placed) == total == len(set(placed))

        deadline = time.monotonic() + 60
        while await table_count(pool, "orders") < total or await group_pending(redis_client, 4):
            assert second.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "restarted daemon did not catch up"
            await asyncio.sleep(0.1)
        stream_total = sum([await redis_client.xlen(s) for s in gateway.stream_names()])
        deadline = time.monotonic() + 10
        while await table_count(pool, "events") < stream_total:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

        assert set(await orders(pool)) == set(placed)
        assert await table_count(pool, "orders") == total
        assert await group_pending(redis_client, 4) == 0
        await assert_projection_matches_redis(gateway, pool, sale_ids)

        code, output = await cli(env_of(settings), "replay", "verify")
        assert code == 0, output

        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second, 15) == 0, log_path.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_stream_ids_parse_to_ordered_positions():
    assert parse_stream_id("1700000000000-3") == (1_700_000_000_000, 3)
    assert parse_stream_id("5-10") > parse_stream_id("5-9")
