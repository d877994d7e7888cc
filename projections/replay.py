"""``flashsale replay verify``: fold the log and compare it with Redis and PostgreSQL.

Redis is compared at the stream position read atomically with its state, PostgreSQL at
the projector's checkpoint, so the comparison is against the same prefix of the log.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from core.events import AnyEvent, parse_event
from core.gateway import RedisGateway, SaleSnapshot
from core.keys import CONSUMER_GROUP, partition_of
from projections.fold import SaleState, fold
from projections.projector import LogEntry, parse_stream_id

COUNTERS = ("stock", "remaining", "held", "confirmed", "released")


@dataclass(frozen=True, slots=True)
class Difference:
    """One field on which a store disagrees with the log."""

    sale_id: str
    source: str  # "redis", "postgres" or "log" (an invariant broken in the log itself)
    field: str
    expected: Any
    actual: Any


@dataclass
class VerifyReport:
    """What verify compared and every difference it found."""

    sales: int = 0
    events: int = 0
    malformed: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.differences

    def to_json(self) -> str:
        return json.dumps(
            {
                "clean": self.clean,
                "sales": self.sales,
                "events": self.events,
                "malformed": self.malformed,
                "differences": [asdict(d) for d in self.differences],
            },
            indent=2,
            default=str,
        )

    def to_table(self) -> str:
        if self.clean:
            return f"clean: {self.sales} sales, {self.events} events agree in log, Redis, PG"
        rows = [("sale", "source", "field", "log", "actual")]
        rows += [
            (d.sale_id, d.source, d.field, str(d.expected), str(d.actual)) for d in self.differences
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        summary = f"DRIFT: {len(self.differences)} differences across {self.sales} sales"
        return "\n".join([summary, *lines])


def _parse(fields: dict[str, str], report: VerifyReport | None) -> AnyEvent | None:
    """The entry's event, or None (counted as malformed) if it cannot be parsed."""
    try:
        return parse_event(fields.get("event", ""))
    except Exception:
        # Parsing is pure; besides ValueError it can raise the upcaster's KeyError, a
        # TypeError on a bad version or OSError on a time out of range. The projector parks
        # such entries on the dead-letter stream, so the fold skips them too.
        if report is not None:
            report.malformed += 1
        return None


async def read_log(
    gateway: RedisGateway, report: VerifyReport | None = None
) -> dict[int, list[LogEntry]]:
    """Every event in every partition stream, in stream order, per partition."""
    log: dict[int, list[LogEntry]] = {}
    for partition in range(gateway.partitions):
        entries = log.setdefault(partition, [])
        async for stream_id, fields in gateway.read_stream(partition):
            event = _parse(fields, report)
            if event is not None:
                entries.append(LogEntry(partition, stream_id, event))
    return log


def _upto(entries: Iterable[LogEntry], position: tuple[int, int]) -> SaleState | None:
    sales = fold(e.event for e in entries if e.position <= position)
    return next(iter(sales.values()), None)


def compare_redis(sale_id: str, expected: SaleState, snap: SaleSnapshot) -> list[Difference]:
    """Differences between the fold and a Redis snapshot of one sale."""
    diffs: list[Difference] = []
    if not snap.exists:
        return [Difference(sale_id, "redis", "sale", "exists", "missing")]
    for name in COUNTERS:
        if snap.counters.get(name) != getattr(expected, name):
            diffs.append(
                Difference(sale_id, "redis", name, getattr(expected, name), snap.counters.get(name))
            )
    for user in sorted(set(expected.holders) | set(snap.holders)):
        want, got = expected.holders.get(user, 0), snap.holders.get(user, 0)
        if want != got:
            diffs.append(Difference(sale_id, "redis", f"holder:{user}", want, got))
    for rid in sorted(set(expected.reservations) | set(snap.reservations)):
        r = expected.reservations.get(rid)
        want_r = (r.status, r.qty, r.user_id) if r else None
        got_r = snap.reservations.get(rid)
        if want_r != got_r:
            diffs.append(Difference(sale_id, "redis", f"reservation:{rid}", want_r, got_r))
    return diffs


async def compare_postgres(
    conn: asyncpg.Connection, sale_id: str, expected: SaleState | None
) -> list[Difference]:
    """Differences between the fold (at the checkpoint) and one sale's PostgreSQL rows."""
    diffs: list[Difference] = []
    row = await conn.fetchrow("SELECT * FROM stock_view WHERE sale_id = $1", sale_id)
    if expected is None:
        if row is not None:
            diffs.append(Difference(sale_id, "postgres", "stock_view", "absent", "present"))
        return diffs
    if row is None:
        return [Difference(sale_id, "postgres", "stock_view", "present", "missing")]
    for name in COUNTERS:
        if row[name] != getattr(expected, name):
            diffs.append(Difference(sale_id, "postgres", name, getattr(expected, name), row[name]))
    orders = {
        r["reservation_id"]: (r["status"], r["qty"], r["user_id"])
        for r in await conn.fetch(
            "SELECT reservation_id, status, qty, user_id FROM orders WHERE sale_id = $1", sale_id
        )
    }
    for rid in sorted(set(expected.reservations) | set(orders)):
        r = expected.reservations.get(rid)
        want = (r.status, r.qty, r.user_id) if r else None
        if want != orders.get(rid):
            diffs.append(Difference(sale_id, "postgres", f"order:{rid}", want, orders.get(rid)))
    return diffs


async def verify(
    gateway: RedisGateway, pool: asyncpg.Pool, sale_id: str | None = None
) -> VerifyReport:
    """Fold the whole log and compare every sale (or one) with Redis and PostgreSQL."""
    report = VerifyReport()
    log = await read_log(gateway, report)
    by_sale: dict[str, list[LogEntry]] = defaultdict(list)
    for entries in log.values():
        report.events += len(entries)
        for entry in entries:
            by_sale[entry.event.sale_id].append(entry)
    # One snapshot for every PostgreSQL read: rows and checkpoints commit together, so the
    # rows read are exactly those of the checkpoints read, even while projectors commit.
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        checkpoints = {
            r["partition"]: (r["stream_ms"], r["stream_seq"])
            for r in await conn.fetch(
                "SELECT partition, stream_ms, stream_seq FROM checkpoints"
                " WHERE consumer_group = $1",
                CONSUMER_GROUP,
            )
        }
        projected = {r["sale_id"] for r in await conn.fetch("SELECT sale_id FROM stock_view")}
        names = sorted(set(by_sale) | projected) if sale_id is None else [sale_id]
        report.sales = len(names)
        for name in names:
            partition = partition_of(name, gateway.partitions)
            snap = await gateway.snapshot_sale(name)
            entries = by_sale.get(name, [])
            last_read = log[partition][-1].stream_id if log[partition] else "0-0"
            if parse_stream_id(snap.last_id) > parse_stream_id(last_read):
                # Purchases landed after we read the log: read the tail up to the snapshot.
                async for stream_id, fields in gateway.read_stream(
                    partition, after=last_read, until=snap.last_id
                ):
                    event = _parse(fields, report)
                    if event is not None and event.sale_id == name:
                        entries.append(LogEntry(partition, stream_id, event))
            in_redis = _upto(entries, parse_stream_id(snap.last_id))
            if in_redis is None:
                if snap.exists:
                    report.differences.append(Difference(name, "redis", "sale", "absent", "exists"))
            else:
                for problem in in_redis.invariant_violations():
                    report.differences.append(
                        Difference(name, "log", "invariant", "holds", problem)
                    )
                report.differences.extend(compare_redis(name, in_redis, snap))
            in_pg = _upto(entries, checkpoints.get(partition, (0, 0)))
            report.differences.extend(await compare_postgres(conn, name, in_pg))
    return report
