"""The reservation lifecycle from Redis to PostgreSQL and back through the fold.

Confirms, cancels, expiries, stock adjustments and closing under concurrency, projected by
the consumer group and checked against Redis, the fold of the log and the replay tool;
lifecycle events delivered out of order and twice; the expiry worker inside real
``flashsale consume`` processes, killed outright and run twice at once; verify noticing
lifecycle drift.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from consumers.expiry import ExpiryWorker
from core.errors import NotEnoughUnsoldStock, RejectedError, SaleNotActive
from core.events import TERMINAL_EVENTS, to_ms
from core.gateway import RedisGateway, SaleSnapshot
from core.keys import CONSUMER_GROUP, partition_of
from core.settings import Settings
from projections.batch import project
from projections.entries import LogEntry
from projections.fold import fold
from projections.verify import Difference, read_log, verify
from tests.conftest import ProjectorFactory
from tests.daemons import (
    caught_up,
    cli,
    env_of,
    eventually,
    logged,
    running,
    start,
    start_consumers,
    stream_length,
    table_count,
    wait_exit,
    wait_started,
)
from tests.helpers import open_sale, pg_rows, text

FLASHSALE = Path(sys.executable).parent / "flashsale"
LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)

COUNTERS = ("stock", "remaining", "held", "confirmed", "released")
STATUSES = ("pending", "confirmed", "cancelled", "expired")
STATUS_TIME = {"confirmed": "confirmed_at", "cancelled": "cancelled_at", "expired": "expired_at"}
TERMINAL_TYPES = {
    "ReservationConfirmed": "confirmed",
    "ReservationCancelled": "cancelled",
    "ReservationExpired": "expired",
}


# --- helpers --------------------------------------------------------------------------------


def sales_in_distinct_partitions(prefix: str, count: int, partitions: int = 4) -> list[str]:
    """``count`` sale ids, each in a partition of its own."""
    assert count <= partitions
    chosen: dict[int, str] = {}
    k = 0
    while len(chosen) < count:
        name = f"{prefix}-{k}"
        chosen.setdefault(partition_of(name, partitions), name)
        k += 1
    return list(chosen.values())


async def log_entries(gateway: RedisGateway) -> list[LogEntry]:
    """Every entry of every partition stream, in stream order per partition."""
    log = await read_log(gateway)
    return [e for p in sorted(log) for e in log[p]]


async def sleep_until(moment: datetime, margin: float = 0.2) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds() + margin))


async def expired_events(gateway: RedisGateway) -> Counter[str]:
    """How many ReservationExpired events the log holds for each reservation id."""
    return Counter(
        e.event.reservation_id
        for e in await log_entries(gateway)
        if e.event.type == "ReservationExpired"
    )


async def assert_lifecycle_consistent(
    gateway: RedisGateway, pool: asyncpg.Pool, sale_ids: Sequence[str]
) -> dict[str, SaleSnapshot]:
    """Redis keeps the invariants, PostgreSQL and the fold of the log both equal Redis, and
    verify is clean. Call once the consumers have caught up."""
    entries = await log_entries(gateway)
    placed = Counter(e.event.reservation_id for e in entries if e.event.type == "ReservationPlaced")
    terminals: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        if isinstance(e.event, TERMINAL_EVENTS):
            terminals[e.event.reservation_id].append(TERMINAL_TYPES[e.event.type])
    folded = fold(e.event for e in entries)
    snaps = {s: await gateway.snapshot_sale(s) for s in sale_ids}
    async with pool.acquire() as conn:
        views = {r["sale_id"]: r for r in await conn.fetch("SELECT * FROM stock_view")}
        orders = {r["reservation_id"]: r for r in await conn.fetch("SELECT * FROM orders")}
    assert (
        await table_count(pool, "events")
        == await stream_length(gateway.client, gateway.partitions)
        == len(entries)
    )
    assert set(views) == set(sale_ids) == set(folded)
    assert set(orders) == {rid for s in snaps.values() for rid in s.reservations}

    for sale_id, snap in snaps.items():
        c = snap.counters
        counters = {k: c[k] for k in COUNTERS}
        # Redis: invariants 1 and 2, and counters that agree with the reservations.
        assert c["remaining"] >= 0, sale_id
        assert c["remaining"] + c["held"] + c["confirmed"] == c["stock"], (sale_id, c)
        assert all(0 < q <= c["per_user_limit"] for q in snap.holders.values()), snap.holders
        owed: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        for status, qty, user in snap.reservations.values():
            by_status[status] += qty
            if status in ("pending", "confirmed"):
                owed[user] += qty
        assert dict(owed) == snap.holders, sale_id
        assert (c["held"], c["confirmed"], c["released"]) == (
            by_status["pending"],
            by_status["confirmed"],
            by_status["cancelled"] + by_status["expired"],
        ), sale_id

        # Every reservation is in exactly one status: one placement, at most one terminal
        # event and only the time of its own final state, in Redis and in PostgreSQL.
        view = views[sale_id]
        assert {k: view[k] for k in COUNTERS} == counters, sale_id
        assert view["closed"] == bool(c["closed"]), sale_id
        for rid, (status, qty, user) in snap.reservations.items():
            assert status in STATUSES, (rid, status)
            assert placed[rid] == 1, rid
            assert terminals.get(rid, []) == ([] if status == "pending" else [status]), rid
            raw = await gateway.client.hgetall(gateway.keys_for_sale(sale_id).reservation(rid))
            fields = {text(k): text(v) for k, v in raw.items()}
            own = STATUS_TIME.get(status)
            assert {f for f in STATUS_TIME.values() if f in fields} == ({own} if own else set())
            row = orders[rid]
            assert (row["sale_id"], row["status"], row["qty"], row["user_id"]) == (
                sale_id,
                status,
                qty,
                user,
            ), rid
            assert row["placed_at"] is not None and row["expires_at"] is not None, rid
            assert to_ms(row["expires_at"]) == int(fields["expires_at"]), rid
            for column in STATUS_TIME.values():
                if column == own:
                    assert row[column] is not None, (rid, column)
                    assert to_ms(row[column]) == int(fields[column]), (rid, column)
                else:
                    assert row[column] is None, (rid, column)
        released = sum(
            r["qty"]
            for r in orders.values()
            if r["sale_id"] == sale_id and r["status"] in ("cancelled", "expired")
        )
        assert view["released"] == released, sale_id

        # The fold of the log is Redis.
        state = folded[sale_id]
        assert state.invariant_violations() == [], sale_id
        assert state.counters() == counters, sale_id
        assert state.holders == snap.holders, sale_id
        assert state.closed == bool(c["closed"]), sale_id
        assert {
            rid: (r.status, r.qty, r.user_id) for rid, r in state.reservations.items()
        } == snap.reservations, sale_id

    report = await verify(gateway, pool)
    assert report.clean, report.differences[:5]
    assert report.lagging == 0 and report.malformed == 0
    return snaps


# --- 1. mixed workload with the daemons running ---------------------------------------------


@dataclass(frozen=True)
class Plan:
    stock: int
    per_user_limit: int
    hold_seconds: int


@dataclass
class Outcomes:
    """What the clients were told."""

    placed: dict[str, str] = field(default_factory=dict)  # reservation -> sale
    won: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    no_change: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    refused: Counter[str] = field(default_factory=Counter)
    applied_delta: Counter[str] = field(default_factory=Counter)
    latest_deadline: datetime = LONG_AGO


async def test_mixed_workload_with_consumers_running_keeps_every_store_in_agreement(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
):
    a, b, c, d = sales_in_distinct_partitions("mix", 4)
    plans = {
        a: Plan(stock=150, per_user_limit=1, hold_seconds=1),
        b: Plan(stock=200, per_user_limit=3, hold_seconds=1),
        c: Plan(stock=120, per_user_limit=2, hold_seconds=600),  # its holds stay pending
        d: Plan(stock=100, per_user_limit=2, hold_seconds=1),  # closed early on
    }
    for sale_id, plan in plans.items():
        await open_sale(gateway, sale_id, plan.stock, plan.per_user_limit, plan.hold_seconds)

    stop = asyncio.Event()
    expiry = ExpiryWorker(gateway, interval=0.05, batch=25)
    projector = make_projector(
        "lifecycle", batch=100, block_ms=50, claim_idle_ms=settings.claim_idle_ms
    )
    daemons = [asyncio.create_task(expiry.run(stop)), asyncio.create_task(projector.run(stop))]
    out = Outcomes()
    late: list[asyncio.Task[None]] = []

    async def attempt(kind: str, rid: str, user: str) -> None:
        action = gateway.confirm if kind == "confirmed" else gateway.cancel
        try:
            changed = await action(rid, user)
        except RejectedError as e:
            out.refused[f"{kind}:{e.code}"] += 1
            return
        (out.won if changed else out.no_change)[rid].append(kind)

    async def late_confirm(rid: str, user: str, delay: float) -> None:
        await asyncio.sleep(delay)  # around the deadline: races the expiry worker
        await attempt("confirmed", rid, user)

    async def buyer(n: int) -> None:
        rng = random.Random(n)
        for step in range(80):
            sale_id = rng.choice([a, b, c, d])
            plan = plans[sale_id]
            user = f"u{rng.randrange(400)}"
            key = f"{n}-{step}" if rng.random() < 0.3 else None
            try:
                p = await gateway.reserve(sale_id, user, rng.randint(1, plan.per_user_limit), key)
            except RejectedError as e:
                out.refused[f"reserve:{e.code}"] += 1
                continue
            assert not p.replayed and p.expires_at is not None
            out.placed[p.reservation_id] = sale_id
            if plan.hold_seconds <= 1:
                out.latest_deadline = max(out.latest_deadline, p.expires_at)
            if key is not None and rng.random() < 0.5:  # a retried request: same reservation
                again = await gateway.reserve(sale_id, user, 1, key)
                assert (again.reservation_id, again.replayed) == (p.reservation_id, True)
            rid, roll = p.reservation_id, rng.random()
            if roll < 0.25:
                await asyncio.gather(
                    attempt("confirmed", rid, user), attempt("confirmed", rid, user)
                )
                await attempt("confirmed", rid, user)
            elif roll < 0.40:
                await asyncio.gather(
                    attempt("cancelled", rid, user), attempt("cancelled", rid, user)
                )
                await attempt("confirmed", rid, user)  # refused: it was cancelled
            elif roll < 0.55:
                await asyncio.gather(
                    attempt("confirmed", rid, user), attempt("cancelled", rid, user)
                )
            elif roll < 0.65 and plan.hold_seconds <= 1:
                late.append(asyncio.create_task(late_confirm(rid, user, rng.uniform(0.8, 1.2))))
            # else: left pending, to expire (or to stay pending in the long-hold sale)

    async def admin() -> None:
        rng = random.Random(4242)
        for i in range(60):
            sale_id = rng.choice([a, b, c, d])
            roll = rng.random()
            if roll < 0.4:
                delta = rng.randint(1, 20)
            elif roll < 0.8:
                delta = -rng.randint(1, 15)
            else:
                delta = -1_000_000  # more than is ever unsold: refused
            key = f"adjust-{i}" if rng.random() < 0.7 else None
            for repeat in range(2 if key else 1):
                try:
                    applied = await gateway.adjust_stock(sale_id, delta, key)
                except NotEnoughUnsoldStock:
                    out.refused["adjust:not_enough_unsold_stock"] += 1
                    break
                assert applied == (repeat == 0), (i, repeat)  # a repeated key changes nothing
                if applied:
                    out.applied_delta[sale_id] += delta
            await asyncio.sleep(0.003)

    async def closer() -> None:
        await asyncio.sleep(0.3)
        assert await gateway.close_sale(d) is True
        assert await gateway.close_sale(d) is False

    try:
        await asyncio.gather(*(buyer(n) for n in range(50)), admin(), closer())
        await asyncio.gather(*late)
        with pytest.raises(SaleNotActive):
            await gateway.reserve(d, "after-close", 1, None)
        await sleep_until(out.latest_deadline)
        final_sweep = await ExpiryWorker(gateway).sweep()
        await eventually(
            lambda: caught_up(gateway.client, pool, gateway.partitions),
            30,
            "projector did not catch up",
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*daemons), 10)

    # The workload exercised what it claims to.
    assert len(out.placed) > 500, len(out.placed)
    for code in (
        "reserve:sold_out",
        "reserve:limit_reached",
        "reserve:sale_not_active",
        "confirmed:reservation_closed",
        "adjust:not_enough_unsold_stock",
    ):
        assert out.refused[code] > 0, (code, out.refused)
    assert out.refused["confirmed:reservation_expired"] + expiry.expired + final_sweep > 0

    snaps = await assert_lifecycle_consistent(gateway, pool, list(plans))

    statuses = Counter(s for snap in snaps.values() for s, _, _ in snap.reservations.values())
    assert all(statuses[s] > 0 for s in STATUSES), statuses
    for sale_id, snap in snaps.items():
        assert snap.counters["stock"] == plans[sale_id].stock + out.applied_delta[sale_id]
        if plans[sale_id].hold_seconds <= 1:  # every short hold ended after the sweep
            assert all(s != "pending" for s, _, _ in snap.reservations.values()), sale_id
    assert snaps[d].counters["closed"] == 1
    # Each reservation a client saw placed exists, and each change a client was told about
    # stuck: one winner per reservation (invariant 5), repeats changed nothing.
    status_of = {rid: s for snap in snaps.values() for rid, (s, _, _) in snap.reservations.items()}
    assert set(out.placed) == set(status_of)
    for rid, won in out.won.items():
        assert len(won) == 1 and status_of[rid] == won[0], (rid, won, status_of[rid])
    for rid, same in out.no_change.items():
        assert all(status_of[rid] == s for s in same), (rid, same, status_of[rid])
    expired_log = await expired_events(gateway)
    assert sum(expired_log.values()) == expiry.expired + final_sweep
    assert max(expired_log.values(), default=1) == 1
    # Nothing was placed in the closed sale after its SaleClosed.
    after_close = False
    for e in await log_entries(gateway):
        if e.event.sale_id == d:
            after_close = after_close or e.event.type == "SaleClosed"
            assert not (after_close and e.event.type == "ReservationPlaced"), e


# --- 2. lifecycle events out of order and twice ---------------------------------------------


async def test_lifecycle_events_out_of_order_and_twice_converge_to_the_in_order_projection(
    gateway: RedisGateway, pool: asyncpg.Pool
):
    long, short, other = sales_in_distinct_partitions("ooo", 3)
    await open_sale(gateway, long, stock=30, per_user_limit=2, hold_seconds=600)
    await open_sale(gateway, short, stock=20, per_user_limit=2, hold_seconds=0)
    await open_sale(gateway, other, stock=15, per_user_limit=3, hold_seconds=600)
    for i in range(12):
        user = f"u{i}"
        rid = (await gateway.reserve(long, user, 1 + i % 2, None)).reservation_id
        if i % 3 == 0:
            assert await gateway.confirm(rid, user) is True
            assert await gateway.confirm(rid, None) is False
        elif i % 3 == 1:
            assert await gateway.cancel(rid, user) is True
            assert await gateway.cancel(rid, user) is False
    for round_ in range(2):  # expire, then the same buyers again with their quota back
        for i in range(8):
            await gateway.reserve(short, f"u{i}", 1 + (i + round_) % 2, None)
        assert await ExpiryWorker(gateway).sweep() == 8
    assert await gateway.adjust_stock(long, 5, "restock") is True
    assert await gateway.adjust_stock(long, 5, "restock") is False
    assert await gateway.adjust_stock(short, -3, None) is True
    with pytest.raises(NotEnoughUnsoldStock):
        await gateway.adjust_stock(other, -1000, None)
    kept = []
    for i in range(5):
        kept.append((await gateway.reserve(other, f"u{i}", 1 + i % 3, None)).reservation_id)
    assert await gateway.confirm(kept[0], "u0") is True
    assert await gateway.close_sale(other) is True
    assert await gateway.cancel(kept[1], "u1") is True  # holds outlive the close
    assert await gateway.adjust_stock(other, -2, None) is True

    entries = await log_entries(gateway)
    kinds: Counter[str] = Counter(e.event.type for e in entries)
    assert all(kinds[t] for t in (*TERMINAL_TYPES, "StockAdjusted", "SaleClosed")), kinds

    async def reset() -> None:
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE events, orders, stock_view, checkpoints")

    async def project_batches(batches: Sequence[Sequence[LogEntry]]) -> int:
        new = 0
        async with pool.acquire() as conn:
            for batch in batches:
                new += await project(conn, CONSUMER_GROUP, batch)
        return new

    assert await project_batches([entries[i : i + 10] for i in range(0, len(entries), 10)]) == len(
        entries
    )
    baseline = await pg_rows(pool)
    await assert_lifecycle_consistent(gateway, pool, [long, short, other])

    rng = random.Random(7)

    def random_batches(items: list[LogEntry]) -> list[list[LogEntry]]:
        batches: list[list[LogEntry]] = []
        while items:
            size = rng.randint(1, 15)
            batches.append(items[:size])
            items = items[size:]
        return batches

    backwards = entries[::-1]
    doubled = entries * 2
    rng.shuffle(doubled)
    terminal_first = sorted(entries, key=lambda e: e.event.type not in TERMINAL_TYPES)
    scenarios: dict[str, list[list[LogEntry]]] = {
        "reversed one at a time, twice": [[e] for e in backwards] * 2,
        "reversed batches, each batch twice": [
            batch for batch in random_batches(backwards) for _ in range(2)
        ],
        "shuffled random batches, every event twice": random_batches(doubled),
        "terminals first, shuffled batches, then reversed again": [
            *random_batches(terminal_first[: len(terminal_first) // 2][::-1]),
            *random_batches(terminal_first[len(terminal_first) // 2 :]),
            backwards,
        ],
    }
    for name, batches in scenarios.items():
        await reset()
        assert await project_batches(batches) == len(entries), name
        assert await pg_rows(pool) == baseline, name


# --- consume processes ----------------------------------------------------------------------


async def place_holds(
    gateway: RedisGateway, sale_ids: Sequence[str], per_sale: int, qty_cycle: int
) -> tuple[dict[str, tuple[str, str, int]], datetime]:
    """Reservations of distinct users in every sale: id -> (sale, user, qty), and the
    latest deadline among them."""
    requests = [
        (sale_id, f"user-{i}", 1 + i % qty_cycle) for sale_id in sale_ids for i in range(per_sale)
    ]
    placed = await asyncio.gather(*(gateway.reserve(s, u, q, None) for s, u, q in requests))
    deadlines = [p.expires_at for p in placed if p.expires_at is not None]
    assert len(deadlines) == len(placed)
    return {p.reservation_id: r for p, r in zip(placed, requests, strict=True)}, max(deadlines)


async def redis_statuses(gateway: RedisGateway, sale_ids: Sequence[str]) -> dict[str, str]:
    return {
        rid: status
        for s in sale_ids
        for rid, (status, _, _) in (await gateway.snapshot_sale(s)).reservations.items()
    }


async def pg_statuses(pool: asyncpg.Pool) -> dict[str, str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT reservation_id, status FROM orders")
    return {r["reservation_id"]: r["status"] for r in rows}


# --- 3. the expiry worker killed outright and restarted -------------------------------------


async def expired_everywhere(
    gateway: RedisGateway, pool: asyncpg.Pool, sale_ids: Sequence[str], overdue: set[str]
) -> bool:
    """Every ``overdue`` hold expired in Redis and in PostgreSQL, and the projection caught up."""
    redis_now = await redis_statuses(gateway, sale_ids)
    pg_now = await pg_statuses(pool)
    return (
        all(redis_now[r] == "expired" for r in overdue)
        and all(pg_now.get(r) == "expired" for r in overdue)
        and await caught_up(gateway.client, pool, gateway.partitions)
    )


async def test_consume_killed_while_holds_pend_expires_every_overdue_hold_once_after_restart(
    gateway: RedisGateway, pool: asyncpg.Pool, settings: Settings, tmp_path: Path
):
    sale_ids = sales_in_distinct_partitions("kill", 2)
    for sale_id in sale_ids:
        await open_sale(gateway, sale_id, stock=100, per_user_limit=2, hold_seconds=2)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(["consume"], env_of(settings), first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_started(first, first_log)
        placed, deadline = await place_holds(gateway, sale_ids, per_sale=40, qty_cycle=2)
        rids = list(placed)
        confirmed, cancelled = set(rids[::9]), set(rids[4::9])
        for rid in confirmed:
            assert await gateway.confirm(rid, placed[rid][1]) is True
        for rid in cancelled:
            assert await gateway.cancel(rid, placed[rid][1]) is True
        overdue = set(rids) - confirmed - cancelled
        await asyncio.sleep(0.3)  # the daemon projects some of it...
        assert (datetime.now(UTC) - deadline).total_seconds() < -0.5
        first.kill()  # ...and dies outright while every overdue-to-be hold is pending
        assert await wait_exit(first, 10) == -signal.SIGKILL
        before = await redis_statuses(gateway, sale_ids)
        assert {before[r] for r in overdue} == {"pending"}

        await sleep_until(deadline, margin=0.3)
        # Nobody returned the stock while the daemon was down.
        assert {(await redis_statuses(gateway, sale_ids))[r] for r in overdue} == {"pending"}
        assert not await expired_events(gateway)

        second = start(["consume"], env_of(settings), second_log)
        alive = running((second, second_log))

        await eventually(
            partial(expired_everywhere, gateway, pool, sale_ids, overdue),
            30,
            "overdue holds were not expired and projected",
            alive,
        )

        expired_log = await expired_events(gateway)
        assert set(expired_log) == overdue and set(expired_log.values()) == {1}
        final = await redis_statuses(gateway, sale_ids)
        assert {final[r] for r in confirmed} == {"confirmed"}
        assert {final[r] for r in cancelled} == {"cancelled"}
        assert await pg_statuses(pool) == final
        for sale_id in sale_ids:
            mine = [(r, q) for r, (s, _, q) in placed.items() if s == sale_id]
            sold = sum(q for r, q in mine if r in confirmed)
            back = sum(q for r, q in mine if r not in confirmed)
            sale = await gateway.get_sale(sale_id)
            assert sale is not None
            assert (sale.remaining, sale.held, sale.confirmed, sale.released) == (
                100 - sold,
                0,
                sold,
                back,
            )
        await assert_lifecycle_consistent(gateway, pool, sale_ids)

        code, output = await cli(env_of(settings), "replay", "verify")
        assert code == 0, output
        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second, 15) == 0, second_log.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


# --- 4. two daemons expiring the same holds -------------------------------------------------


def logged_expiries(log_path: Path) -> int:
    """Sum of the ``count`` of every ``reservations_expired`` record a daemon logged."""
    return sum(int(r["count"]) for r in logged(log_path, "reservations_expired"))


async def test_two_consume_daemons_never_expire_a_hold_twice(
    gateway: RedisGateway, pool: asyncpg.Pool, settings: Settings, tmp_path: Path
):
    sale_ids = sales_in_distinct_partitions("twin", 4)
    for sale_id in sale_ids:
        await open_sale(gateway, sale_id, stock=250, per_user_limit=3, hold_seconds=1)
    logs = [tmp_path / "consume-a.log", tmp_path / "consume-b.log"]
    # Small, frequent sweeps so the two workers' calls interleave on the same deadlines.
    tuning = {"FLASHSALE_EXPIRY_BATCH": "7", "FLASHSALE_EXPIRY_INTERVAL_MS": "20"}
    procs = await start_consumers(env_of(settings, **tuning), *logs)
    try:
        alive = running(*zip(procs, logs, strict=True))
        placed, _ = await place_holds(gateway, sale_ids, per_sale=100, qty_cycle=3)
        confirmed = set(list(placed)[::10])
        await asyncio.gather(*(gateway.confirm(r, placed[r][1]) for r in confirmed))
        overdue = set(placed) - confirmed
        assert len(overdue) >= 300

        await eventually(
            partial(expired_everywhere, gateway, pool, sale_ids, overdue),
            30,
            "holds were not expired and projected",
            alive,
        )
        await asyncio.sleep(0.3)  # give a double expiry, if any, the time to show up

        expired_log = await expired_events(gateway)
        assert set(expired_log) == overdue
        assert set(expired_log.values()) == {1}, expired_log.most_common(3)
        assert sum(logged_expiries(p) for p in logs) == len(overdue)
        for sale_id in sale_ids:
            mine = {r: q for r, (s, _, q) in placed.items() if s == sale_id}
            sold = sum(q for r, q in mine.items() if r in confirmed)
            back = sum(q for r, q in mine.items() if r in overdue)
            sale = await gateway.get_sale(sale_id)
            assert sale is not None
            assert (sale.stock, sale.remaining, sale.held, sale.confirmed, sale.released) == (
                250,
                250 - sold,
                0,
                sold,
                back,
            ), sale_id
        await eventually(
            partial(caught_up, gateway.client, pool, gateway.partitions), 10, "projector lag", alive
        )
        await assert_lifecycle_consistent(gateway, pool, sale_ids)

        code, output = await cli(env_of(settings), "replay", "verify")
        assert code == 0, output
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, path in zip(procs, logs, strict=True):
            assert await wait_exit(proc, 15) == 0, path.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- 5. verify finds lifecycle drift --------------------------------------------------------


@dataclass(frozen=True)
class Projected:
    """Two projected sales: one with every outcome but expiry, one whose holds expired."""

    paid: str
    lapsed: str
    reservations: dict[str, tuple[str, str, int, str]]  # id -> (sale, user, qty, status)


@pytest.fixture
async def projected(
    make_projector: ProjectorFactory,
    gateway: RedisGateway,
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    settings: Settings,
) -> Projected:
    paid, lapsed = sales_in_distinct_partitions("drift", 2)
    await open_sale(gateway, paid, stock=20, per_user_limit=2, hold_seconds=600)
    await open_sale(gateway, lapsed, stock=20, per_user_limit=2, hold_seconds=0)
    for i in range(6):
        rid = (await gateway.reserve(paid, f"u{i}", 1 + i % 2, None)).reservation_id
        if i % 3 == 0:
            await gateway.confirm(rid, f"u{i}")
        elif i % 3 == 1:
            await gateway.cancel(rid, f"u{i}")
        await gateway.reserve(lapsed, f"u{i}", 1 + i % 2, None)
    assert await ExpiryWorker(gateway).sweep() == 6
    await gateway.adjust_stock(paid, 4, None)
    p = make_projector("drift", batch=50)
    await p.ensure_groups()
    while batch := await p.read_new(block_ms=10):
        await p.handle(batch)
    reservations = {
        rid: (sale_id, user, qty, status)
        for sale_id in (paid, lapsed)
        for rid, (status, qty, user) in (await gateway.snapshot_sale(sale_id)).reservations.items()
    }
    await assert_lifecycle_consistent(gateway, pool, [paid, lapsed])
    return Projected(paid, lapsed, reservations)


def one_with(projected: Projected, sale_id: str, status: str) -> tuple[str, str, int]:
    for rid, (sale, user, qty, current) in sorted(projected.reservations.items()):
        if (sale, current) == (sale_id, status):
            return rid, user, qty
    raise AssertionError(f"no {status} reservation in {sale_id}")


async def _confirmed_made_pending_in_redis(
    projected: Projected, gateway: RedisGateway, pool: asyncpg.Pool
) -> Difference:
    rid, user, qty = one_with(projected, projected.paid, "confirmed")
    key = gateway.keys_for_sale(projected.paid).reservation(rid)
    await gateway.client.hset(key, "status", "pending")
    return Difference(
        projected.paid,
        "redis",
        f"reservation:{rid}",
        ("confirmed", qty, user),
        ("pending", qty, user),
    )


async def _released_changed_in_postgres(
    projected: Projected, gateway: RedisGateway, pool: asyncpg.Pool
) -> Difference:
    sale = await gateway.get_sale(projected.lapsed)
    assert sale is not None and sale.released > 0
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE stock_view SET released = released - 2 WHERE sale_id = $1", projected.lapsed
        )
    return Difference(projected.lapsed, "postgres", "released", sale.released, sale.released - 2)


async def _expired_order_made_pending_in_postgres(
    projected: Projected, gateway: RedisGateway, pool: asyncpg.Pool
) -> Difference:
    rid, user, qty = one_with(projected, projected.lapsed, "expired")
    async with pool.acquire() as conn:
        await conn.execute("UPDATE orders SET status = 'pending' WHERE reservation_id = $1", rid)
    return Difference(
        projected.lapsed, "postgres", f"order:{rid}", ("expired", qty, user), ("pending", qty, user)
    )


Drift = Callable[[Projected, RedisGateway, asyncpg.Pool], Awaitable[Difference]]


@pytest.mark.parametrize(
    "drift",
    [
        _confirmed_made_pending_in_redis,
        _released_changed_in_postgres,
        _expired_order_made_pending_in_postgres,
    ],
    ids=["redis reservation confirmed->pending", "pg released", "pg order expired->pending"],
)
async def test_verify_reports_lifecycle_drift_with_sale_and_field(
    projected: Projected,
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    settings: Settings,
    drift: Drift,
):
    expected = await drift(projected, gateway, pool)

    report = await verify(gateway, pool)
    assert report.differences == [expected]
    other = projected.lapsed if expected.sale_id == projected.paid else projected.paid
    assert (await verify(gateway, pool, other)).clean  # the other sale is not blamed

    code, output = await cli(env_of(settings), "replay", "verify")
    assert code == 1, output
    assert output.startswith("DRIFT: 1 differences"), output
    row = next(line for line in output.splitlines() if line.startswith(expected.sale_id))
    assert row.split()[:3] == [expected.sale_id, expected.source, expected.field], output
