"""Benchmark: ``flashsale replay rebuild`` of a large log.

Run:  .venv/bin/python -m bench.bench_rebuild [--events 1000000] [--layout both]

Writes a synthetic but valid log straight into the partition streams (XADD with explicit
ids, pipelined) and/or the PostgreSQL archive (COPY), as the Lua scripts and the projector
would have left it, then times the rebuild and checks the rebuilt tables. Layouts:
``both`` (streams untrimmed and everything archived: today's steady state), ``trimmed``
(the archive holds everything, the streams only the last 1%), ``stream`` (nothing archived
yet: the rebuild archives every event too). It wipes the servers it writes to, so it always
starts embedded ones of its own, and runs on the event loop ``flashsale replay rebuild``
runs on (uvloop where installed). Prints figures, the seconds of each phase among them;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis

from api.cli.launcher import embedded_servers
from api.cli.processes import run_async
from api.cli.replay import ProgressLine
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, PartitionKeys, partition_of
from core.settings import Settings
from projections.db import open_pool
from projections.rebuild import Progress, rebuild

BASE_MS = 1_700_000_000_000
OUTCOMES = (
    ("ReservationConfirmed",) * 12 + ("ReservationCancelled",) * 3 + ("ReservationExpired",) * 5
)


@dataclass(frozen=True, slots=True)
class Row:
    """One synthetic event with its stream position."""

    partition: int
    ms: int
    seq: int
    event: dict[str, object]

    @property
    def stream_id(self) -> str:
        """The entry's id in its partition stream."""
        return f"{self.ms}-{self.seq}"


def synthetic_log(events: int, sales: int, partitions: int) -> Iterator[Row]:
    """A valid log of about ``events`` events: sales, then placements each followed, 1,000
    placements later, by its confirmation, cancellation or expiry (the last ones stay
    pending). Positions grow per partition, one millisecond per event."""
    clock: dict[int, int] = {}
    open_: list[dict[str, object]] = []

    def row(event: dict[str, object]) -> Row:
        p = partition_of(str(event["sale_id"]), partitions)
        ms = clock[p] = clock.get(p, BASE_MS) + 1
        return Row(p, ms, 0, event | {"v": 1, "event_id": uuid.uuid4().hex, "occurred_at": ms})

    names = [f"bench-{n}" for n in range(sales)]
    for name in names:
        yield row(
            {
                "type": "SaleCreated",
                "sale_id": name,
                "stock": 10**9,
                "per_user_limit": 10**9,
                "starts_at": BASE_MS,
                "hold_seconds": 600,
            }
        )
    written, n = sales, 0
    while written < events:
        name = names[n % sales]
        placed = {
            "sale_id": name,
            "reservation_id": f"{partition_of(name, partitions)}-{uuid.uuid4().hex}",
            "user_id": f"user-{n}",
            "qty": 1 + n % 2,
        }
        yield row({"type": "ReservationPlaced", "expires_at": BASE_MS + 10**9} | placed)
        open_.append(placed)
        written += 1
        if len(open_) > 1000 and written < events:
            yield row({"type": OUTCOMES[n % len(OUTCOMES)]} | open_.pop(0))
            written += 1
        n += 1


async def write_streams(
    client: aioredis.Redis, rows: list[Row], partitions: int, batch: int = 10_000
) -> None:
    """XADD every row with its explicit id, pipelined."""
    for start in range(0, len(rows), batch):
        async with client.pipeline(transaction=False) as pipe:
            for r in rows[start : start + batch]:
                pipe.xadd(
                    PartitionKeys(r.partition, partitions).events,
                    {"event": json.dumps(r.event)},
                    r.stream_id,
                )
            await pipe.execute()


async def write_archive(pool: asyncpg.Pool, rows: list[Row], batch: int = 100_000) -> None:
    """COPY every row into the events archive, ``batch`` rows per COPY: one COPY of a
    million rows can outlast the pool's command timeout on a busy machine."""
    columns = ["event_id", "partition", "stream_id", "stream_ms", "stream_seq", "sale_id", "type"]
    for start in range(0, len(rows), batch):
        records = [
            (
                str(r.event["event_id"]),
                r.partition,
                r.stream_id,
                r.ms,
                r.seq,
                str(r.event["sale_id"]),
                str(r.event["type"]),
                datetime.fromtimestamp(r.ms / 1000, tz=UTC),
                json.dumps(r.event),
            )
            for r in rows[start : start + batch]
        ]
        async with pool.acquire() as conn:
            await conn.copy_records_to_table(
                "events", records=records, columns=[*columns, "occurred_at", "payload"]
            )


class PhaseClock:
    """A progress callback that passes each call on and notes how long each phase took."""

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = {}
        self.phase = ""
        self.since = 0.0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if phase != self.phase:
            self.stop(now)
            self.phase, self.since = phase, now
        self.inner(phase, done, total)

    def stop(self, now: float) -> None:
        """Close the current phase's time."""
        if self.phase:
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
            self.phase = ""

    def summary(self) -> str:
        """One line: seconds per phase, in the order they first ran."""
        return "phases: " + ", ".join(f"{p} {s:.2f} s" for p, s in self.seconds.items())


async def run(settings: Settings, events: int, sales: int, layout: str, vacuum: bool) -> None:
    """Write the log in ``layout``, rebuild, check the rebuilt tables and print the figures."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    pool = await open_pool(settings.database_url or "", 4)
    try:
        started = time.perf_counter()
        rows = list(synthetic_log(events, sales, settings.partitions))
        if layout in ("both", "trimmed"):
            await write_archive(pool, rows)
        in_streams = rows[-len(rows) // 100 :] if layout == "trimmed" else rows
        await write_streams(client, in_streams, settings.partitions)
        for p in range(settings.partitions):
            stream = PartitionKeys(p, settings.partitions).events
            await client.xgroup_create(stream, CONSUMER_GROUP, id="$", mkstream=True)
        print(
            f"wrote {len(rows):,} events ({layout}) in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        del rows, in_streams
        if vacuum:
            # As autovacuum keeps a live archive: the archive checks then read the index alone.
            async with pool.acquire() as conn:
                await conn.execute("VACUUM ANALYZE events")
        gateway = RedisGateway.from_settings(client, settings)
        line = ProgressLine(sys.stderr)
        clock = PhaseClock(line)
        try:
            report = await rebuild(gateway, pool, progress=clock)
        finally:
            clock.stop(time.perf_counter())
            line.close()
        async with pool.acquire() as conn:
            orders = await conn.fetchval("SELECT count(*) FROM orders")
            archived = await conn.fetchval("SELECT count(*) FROM events")
        assert orders == report.orders and archived == report.events, (orders, archived)
        print(report.summary())
        print(
            f"rebuild of {report.events:,} events: {report.seconds:.1f} s,"
            f" {report.rate:,.0f} events/s"
        )
        print(clock.summary())
    finally:
        await pool.close()
        await client.aclose()


def main() -> None:
    """Entry point: parse the flags, start embedded servers, run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sales", type=int, default=100)
    parser.add_argument("--layout", choices=("both", "trimmed", "stream"), default="both")
    parser.add_argument("--no-vacuum", action="store_true", help="skip VACUUM after writing")
    args = parser.parse_args()
    with embedded_servers(None, None) as urls:
        settings = Settings(redis_url=urls.redis_url, database_url=urls.database_url)
        run_async(run(settings, args.events, args.sales, args.layout, not args.no_vacuum))


if __name__ == "__main__":
    main()
