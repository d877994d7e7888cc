"""Benchmark: the projector, streams into PostgreSQL.

Run:  .venv/bin/python -m bench.bench_projection throughput [--placements 100000]
      .venv/bin/python -m bench.bench_projection latency [--rate 5000] [--seconds 10]
      .venv/bin/python -m bench.bench_projection copy [--placements 100000]

Uses ``FLASHSALE_REDIS_URL`` / ``FLASHSALE_DATABASE_URL`` when set (it flushes that Redis
database and empties the projection tables), else starts embedded servers of its own.
Prints figures; asserts nothing about speed.

``throughput``: creates the sales through the gateway, then preloads the partition streams
with placements written exactly as ``core/lua/reserve.lua`` writes them (one XADD of a
compact JSON ``event`` field, pipelined), starts ``--consumers`` projector processes (by
default as many as ``flashsale consume`` runs: ``FLASHSALE_CONSUMER_WORKERS``, else one per
CPU; each as one of its processes runs, on uvloop, with its own Redis client and pool;
above one they share the partitions through leases) and times from the moment all are
ready (imports done, pools open) until PostgreSQL holds every event: until the group's
checkpoints, polled every 20 ms, reach each stream's last entry (a checkpoint commits with
its batch, so that is the moment). A ``count(*)`` of the archive every 20 ms, as before,
took about 1.5 s of PostgreSQL CPU per 100,000 events from the consumers of a 2-core
machine.
Besides the consumers' CPU per event it prints their PostgreSQL backends' (from ``/proc``,
when the server runs on this machine).

``copy``: the bare baseline of the throughput figure, what this machine's PostgreSQL takes
at best: one asyncpg ``copy_records_to_table`` of ``--placements`` rows shaped as the
archive's (the same columns and values as the throughput run's placements, made before the
clock starts) into a table like ``events`` without its indexes, from one process. The
projection does far more per event (three tables, their indexes, deduplication), so the
ratio of the two says how close it comes, on any machine.

``latency``: the projector processes running, ``--placers`` other processes place
reservations through the gateway (the reserve script) at a fixed rate in all and note when
each reply came back; the projectors note when each placement's transaction committed (just
after :meth:`Projector.handle` returns: commit, then XACK, one Redis round trip later).
Both are ``time.time()`` of one machine, so the lag per reservation is exact to the clocks'
resolution plus that round trip (well under a millisecond): an upper bound of the time from
the reply to a visible order row. A placer that cannot keep the rate (at most 100 calls in
flight each) falls behind it; the rate reached is printed. With more than one projector,
the placers start once the projectors share the partitions (each partition leased, none
holding more than its fair share) and ``--block-ms`` later: the figure is the steady
state's. Before that, a partition given back by one projector waits for the other to take
it. (Before projectors with leases capped their blocking reads at the lease watch period,
one taken while its new holder was blocked reading its others was read only once that read
returned: three runs that placed from the first moment had p99s of 17, 308 and 19 ms; with
the cap, five had 11 to 22 ms, maxima 20 to 90 ms.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from api.cli.launcher import embedded_servers
from api.cli.processes import run_async
from api.cli.workers import consumer_worker_count
from api.connections import redis_client_for
from consumers.entries import text
from consumers.projector import Delivery, Prepared, Projector
from core.events import from_ms
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, PartitionKeys, partition_of
from core.models import NewSale
from core.settings import Settings
from projections.db import open_pool
from projections.entries import parse_stream_id
from projections.tables import events

_TABLES = "events, orders, stock_view, checkpoints"
_COPY_TABLE = "bench_copy_baseline"
_IN_FLIGHT = 100


async def reset(client: aioredis.Redis, pool: asyncpg.Pool) -> None:
    """Flush the Redis database and empty the projection tables."""
    await client.flushdb()
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {_TABLES}")


async def create_sales(gateway: RedisGateway, sales: int, stock: int) -> list[str]:
    """Open ``sales`` sales (through the gateway: real SaleCreated events); their ids."""
    names = [f"bench-{n}" for n in range(sales)]
    for name in names:
        await gateway.create_sale(
            NewSale(sale_id=name, stock=stock, per_user_limit=10, hold_seconds=3600)
        )
    return names


def placement(name: str, partitions: int, n: int, now_ms: int) -> str:
    """A ReservationPlaced event as reserve.lua's cjson writes it (compact JSON)."""
    return json.dumps(
        {
            "type": "ReservationPlaced",
            "v": 1,
            "event_id": uuid.uuid4().hex,
            "sale_id": name,
            "occurred_at": now_ms,
            "reservation_id": f"{partition_of(name, partitions)}-{uuid.uuid4().hex}",
            "user_id": f"user-{n}",
            "qty": 1,
            "expires_at": now_ms + 3_600_000,
        },
        separators=(",", ":"),
    )


async def preload(
    client: aioredis.Redis, names: list[str], partitions: int, placements: int
) -> None:
    """XADD ``placements`` placements spread over the sales, pipelined."""
    now_ms = int(time.time() * 1000)
    chunk = 10_000
    for start in range(0, placements, chunk):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + chunk, placements)):
                name = names[n % len(names)]
                stream = PartitionKeys(partition_of(name, partitions), partitions).events
                pipe.xadd(stream, {"event": placement(name, partitions, n, now_ms)})
            await pipe.execute()


@dataclass(frozen=True, slots=True)
class ConsumerRun:
    """What one consumer process did: events new to PostgreSQL, its CPU seconds, and
    (stamping) when each reservation's placement was committed."""

    projected: int
    cpu: float
    committed: dict[str, float]
    backend_cpu: float | None = None  # its PostgreSQL backends' CPU seconds, if readable


def process_cpu(pids: Sequence[int]) -> float | None:
    """CPU seconds (user and system) of the processes ``pids`` of this machine, from
    ``/proc``; None where that cannot be read (another machine's server, another OS)."""
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


async def backend_pids(pool: asyncpg.Pool, size: int) -> list[int]:
    """The server process ids of the pool's ``size`` connections (all opened now)."""
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(pool.acquire()) for _ in range(size)]
        return [await conn.fetchval("SELECT pg_backend_pid()") for conn in conns]


async def consume(
    settings: Settings, name: str, options: argparse.Namespace, go: Any, stop: Any, ready: Any
) -> ConsumerRun:
    """Run one projector from ``go`` until ``stop`` (multiprocessing events), saying
    ``ready`` first (imports done, pool open). Its Redis client is the one ``flashsale
    consume`` builds."""
    client = redis_client_for(settings)
    pool = await open_pool(settings.database_url or "", 2)
    projector = StampingProjector(
        client,
        pool,
        settings.partitions,
        consumer=name,
        batch=options.batch,
        block_ms=options.block_ms,
        lease_ms=settings.consumer_lease_ms if options.consumers > 1 else 0,
    )
    projector.committed = {}
    projector.stamping = options.mode == "latency"
    await projector.ensure_groups()
    backends = await backend_pids(pool, 2)
    ready.send("ready")
    await asyncio.to_thread(go.wait)
    cpu = time.process_time()
    backend_cpu = process_cpu(backends)
    stopped = asyncio.Event()
    task = asyncio.create_task(projector.run(stopped))
    await asyncio.to_thread(stop.wait)
    stopped.set()
    await task
    cpu = time.process_time() - cpu
    after = process_cpu(backends)
    await pool.close()
    await client.aclose()
    spent = None if after is None or backend_cpu is None else after - backend_cpu
    return ConsumerRun(projector.projected, cpu, projector.committed, spent)


def consumer_process(
    settings: Settings, name: str, options: argparse.Namespace, go: Any, stop: Any, out: Any
) -> None:
    """A consumer process of its own, as ``flashsale consume`` runs one (on uvloop where it
    is installed); sends its
    :class:`ConsumerRun` back through ``out`` once stopped."""
    out.send(run_async(consume(settings, name, options, go, stop, out)))
    out.close()


@contextlib.asynccontextmanager
async def consumers(
    settings: Settings, options: argparse.Namespace
) -> AsyncIterator[list[ConsumerRun]]:
    """``options.consumers`` consumer processes, ready (imports done, pools open) before the
    block starts and stopped when it exits; the list is filled with their runs then."""
    spawn = multiprocessing.get_context("spawn")
    go, stop = spawn.Event(), spawn.Event()
    pipes = [spawn.Pipe(duplex=False) for _ in range(options.consumers)]
    processes = [
        spawn.Process(target=consumer_process, args=(settings, f"bench-{i}", options, go, stop, w))
        for i, (_, w) in enumerate(pipes)
    ]
    for process in processes:
        process.start()
    runs: list[ConsumerRun] = []
    try:
        for r, _ in pipes:
            await asyncio.to_thread(r.recv)  # "ready"
        go.set()
        yield runs
    finally:
        stop.set()
        go.set()
        for r, _ in pipes:
            runs.append(await asyncio.to_thread(r.recv))
        for process in processes:
            process.join()


async def leases_settled(client: aioredis.Redis, partitions: int, consumers: int) -> bool:
    """Whether ``consumers`` projectors share the partitions: each partition leased, and
    none holding more than its fair share."""
    async with client.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            pipe.get(PartitionKeys(p, partitions).lease(CONSUMER_GROUP))
        owners: list[Any] = await pipe.execute()
    held = Counter(owners)
    fair = -(-partitions // consumers)
    return None not in held and len(held) == consumers and max(held.values()) <= fair


async def wait_until(check: Callable[[], bool], period: float, within: float) -> None:
    """Poll ``check`` every ``period`` seconds until true or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(period)


async def wait_until_async(
    check: Callable[[], Awaitable[bool]], period: float, within: float
) -> None:
    """Poll ``check`` every ``period`` seconds until true or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(period)


async def count_is(pool: asyncpg.Pool, table: str, expected: int) -> bool:
    """Whether ``table`` holds ``expected`` rows (or more)."""
    return await count(pool, table) >= expected


async def stream_ends(client: aioredis.Redis, partitions: int) -> dict[int, tuple[int, int]]:
    """The position of each non-empty partition stream's last entry."""
    ends: dict[int, tuple[int, int]] = {}
    for p in range(partitions):
        last = await client.xrevrange(PartitionKeys(p, partitions).events, count=1)
        if last:
            ends[p] = parse_stream_id(text(last[0][0] or ""))
    return ends


async def checkpoints_reach(pool: asyncpg.Pool, ends: dict[int, tuple[int, int]]) -> bool:
    """Whether the projector group's checkpoint of every partition in ``ends`` reached it."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT partition, stream_ms, stream_seq FROM checkpoints WHERE consumer_group = $1",
            CONSUMER_GROUP,
        )
    reached = {r["partition"]: (r["stream_ms"], r["stream_seq"]) for r in rows}
    return all(reached.get(p, (0, 0)) >= end for p, end in ends.items())


async def count(pool: asyncpg.Pool, table: str) -> int:
    """Rows in ``table``."""
    async with pool.acquire() as conn:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    return n


async def throughput(settings: Settings, args: argparse.Namespace) -> None:
    """Preload the streams, then time the projectors until PostgreSQL holds every event."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    pool = await open_pool(settings.database_url or "", 2)
    try:
        await reset(client, pool)
        gateway = RedisGateway.from_settings(client, settings)
        names = await create_sales(gateway, args.sales, args.placements)
        started = time.perf_counter()
        await preload(client, names, settings.partitions, args.placements)
        total = args.placements + len(names)
        print(
            f"preloaded {args.placements:,} placements over {len(names)} sales"
            f" in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        ends = await stream_ends(client, settings.partitions)
        async with consumers(settings, args) as runs:
            started = time.perf_counter()
            await wait_until_async(lambda: checkpoints_reach(pool, ends), 0.02, 3600)
            seconds = time.perf_counter() - started
        archived, orders = await count(pool, "events"), await count(pool, "orders")
        cpu = sum(r.cpu for r in runs)
        print(
            f"projected {total:,} events with {args.consumers} consumer process(es),"
            f" batch {args.batch}: {seconds:.2f} s, {total / seconds:,.0f} events/s"
            f" (events {archived:,}, orders {orders:,},"
            f" new {' + '.join(f'{r.projected:,}' for r in runs)});"
            f" consumers' CPU {cpu * 1e6 / total:.1f} us/event{backends_cpu(runs, total)}"
        )
    finally:
        await pool.close()
        await client.aclose()


def archive_rows(names: list[str], partitions: int, placements: int) -> list[tuple[Any, ...]]:
    """``placements`` rows in the archive's column order (``projections.tables.events``),
    as the throughput run's placements make them."""
    now_ms = int(time.time() * 1000)
    rows = []
    for n in range(placements):
        name = names[n % len(names)]
        payload = placement(name, partitions, n, now_ms)
        event = json.loads(payload)
        rows.append(
            (
                event["event_id"],
                partition_of(name, partitions),
                f"{now_ms}-{n}",
                now_ms,
                n,
                name,
                event["type"],
                from_ms(now_ms),
                payload,
            )
        )
    return rows


async def copy_baseline(settings: Settings, args: argparse.Namespace) -> None:
    """Time one COPY of ``args.placements`` archive rows into an index-free copy of
    ``events``."""
    pool = await open_pool(settings.database_url or "", 1)
    rows = archive_rows([f"bench-{n}" for n in range(args.sales)], settings.partitions,
                        args.placements)  # fmt: skip
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                f"DROP TABLE IF EXISTS {_COPY_TABLE};"
                f" CREATE TABLE {_COPY_TABLE} (LIKE events INCLUDING DEFAULTS)"
            )
            started = time.perf_counter()
            await conn.copy_records_to_table(
                _COPY_TABLE, records=rows, columns=list(events.COLUMNS), timeout=None
            )
            seconds = time.perf_counter() - started
            await conn.execute(f"DROP TABLE {_COPY_TABLE}")
    finally:
        await pool.close()
    print(
        f"copied {len(rows):,} archive rows with one asyncpg COPY: {seconds:.2f} s,"
        f" {len(rows) / seconds:,.0f} rows/s"
    )


def backends_cpu(runs: Sequence[ConsumerRun], events: int) -> str:
    """``, PostgreSQL backends' CPU N us/event`` (the consumers' connections), if known."""
    spent = [r.backend_cpu for r in runs]
    if not spent or None in spent:
        return ""
    return (
        f", their PostgreSQL backends' CPU {sum(filter(None, spent)) * 1e6 / events:.1f} us/event"
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def place_at_rate(
    settings: Settings, names: list[str], rate: float, seconds: float, first: int
) -> dict[str, float]:
    """Place reservations through the gateway at ``rate`` per second for ``seconds`` (buyers
    numbered from ``first``); the moment (``time.time()``) each reply came back, by
    reservation id. Every millisecond tick starts the placements due by then, up to 100 in
    flight: a placer that cannot keep up falls behind the rate, it does not pile up."""
    client = aioredis.Redis.from_url(settings.redis_url or "", max_connections=_IN_FLIGHT)
    gateway = RedisGateway.from_settings(client, settings)
    replied: dict[str, float] = {}
    pending: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        result = await gateway.reserve(names[n % len(names)], f"user-{n}", 1, None)
        replied[result.reservation_id] = time.time()

    started = time.perf_counter()
    due, placed = int(rate * seconds), 0
    while placed < due:
        target = min(due, int((time.perf_counter() - started) * rate) + 1)
        for n in range(placed, min(target, placed + _IN_FLIGHT - len(pending))):
            task = asyncio.create_task(one(first + n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            placed += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*pending)
    await client.aclose()
    return replied


def placer(
    settings: Settings, names: list[str], rate: float, seconds: float, first: int, out: Any
) -> None:
    """A process of its own placing at ``rate`` (as API processes would, apart from the
    projector), sending back ``(reply moments, seconds it took)`` through ``out``."""
    started = time.perf_counter()
    replied = asyncio.run(place_at_rate(settings, names, rate, seconds, first))
    out.send((replied, time.perf_counter() - started))
    out.close()


class StampingProjector(Projector):
    """A projector that notes when each reservation's placement was committed: just after
    :meth:`Projector.handle` returns, which commits, then acknowledges (one Redis round
    trip later than the commit)."""

    committed: dict[str, float]  # reservation id -> when its batch committed
    stamping: bool = True

    async def handle(self, deliveries: Sequence[Delivery], prepared: Prepared | None = None) -> int:
        new = await super().handle(deliveries, prepared)
        if not self.stamping:
            return new
        now = time.time()
        for d in deliveries:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.committed.setdefault(json.loads(d.fields["event"])["reservation_id"], now)
        return new


async def latency(settings: Settings, args: argparse.Namespace) -> None:
    """Place at a fixed rate from another process and print the lag percentiles from each
    script reply to the commit of its order row."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    pool = await open_pool(settings.database_url or "", 2)
    try:
        await reset(client, pool)
        names = await create_sales(
            RedisGateway.from_settings(client, settings), args.sales, int(args.rate * args.seconds)
        )
        async with consumers(settings, args) as runs:
            if args.consumers > 1:
                await wait_until_async(
                    lambda: leases_settled(client, settings.partitions, args.consumers), 0.02, 30
                )
                await asyncio.sleep(args.block_ms / 1000)  # the reads blocked before it return
            spawn = multiprocessing.get_context("spawn")
            pipes = [spawn.Pipe(duplex=False) for _ in range(args.placers)]
            processes = [
                spawn.Process(
                    target=placer,
                    args=(settings, names, args.rate / args.placers, args.seconds, i * 10**7, w),
                )
                for i, (_, w) in enumerate(pipes)
            ]
            for process in processes:
                process.start()
            replied: dict[str, float] = {}
            took = 0.0
            for r, _ in pipes:
                part, seconds = await asyncio.to_thread(r.recv)
                replied.update(part)
                took = max(took, seconds)
            for process in processes:
                process.join()
            await wait_until_async(lambda: count_is(pool, "orders", len(replied)), 0.05, 60)
        committed: dict[str, float] = {}
        for run in runs:
            committed.update(run.committed)
        lags = [(committed[r] - t) * 1000 for r, t in replied.items() if r in committed]
        print(
            f"placed {len(replied):,} at {len(replied) / took:,.0f}/s (asked {args.rate:,}/s),"
            f" {args.placers} placer processes, {args.consumers} consumer process(es),"
            f" batch {args.batch}, block {args.block_ms} ms;"
            f" script reply -> order row committed: p50 {percentile(lags, 0.5):.1f} ms,"
            f" p99 {percentile(lags, 0.99):.1f} ms, max {max(lags):.1f} ms;"
            f" {len(replied) - len(lags)} never seen"
        )
    finally:
        await pool.close()
        await client.aclose()


def main() -> None:
    """Entry point: parse the flags, use the given servers or start embedded ones, run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("throughput", "latency", "copy"))
    parser.add_argument("--placements", type=int, default=100_000)
    parser.add_argument("--sales", type=int, default=20)
    parser.add_argument(
        "--consumers",
        type=int,
        default=None,
        help="projector processes (default: as many as `flashsale consume` runs,"
        " FLASHSALE_CONSUMER_WORKERS or one per CPU)",
    )
    parser.add_argument(
        "--batch", type=int, default=Settings.model_fields["consumer_batch"].default
    )
    parser.add_argument(
        "--block-ms", type=int, default=Settings.model_fields["consumer_block_ms"].default
    )
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--placers", type=int, default=2, help="processes placing")
    args = parser.parse_args()
    env = Settings()  # FLASHSALE_* from the environment
    if args.consumers is None:
        args.consumers = consumer_worker_count(env)
    with embedded_servers(env.redis_url, env.database_url) as urls:
        settings = env.model_copy(
            update={"redis_url": urls.redis_url, "database_url": urls.database_url}
        )
        modes = {"throughput": throughput, "latency": latency, "copy": copy_baseline}
        asyncio.run(modes[args.mode](settings, args))


if __name__ == "__main__":
    main()
