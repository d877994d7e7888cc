"""``flashsale replay verify``: fold the log and compare it with Redis and PostgreSQL.

Redis is compared with the fold of the log up to the stream position read atomically with
its state. PostgreSQL is compared with the fold of the events its archive holds; a logged
event not archived yet is lag while the projector group has it pending or undelivered, and
drift (lost) once the group has acknowledged it. So a healthy system under load verifies
clean, and an event lost between Redis and PostgreSQL does not.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from core.events import AnyEvent, parse_event
from core.gateway import GroupProgress, RedisGateway, SaleSnapshot
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
    lagging: int = 0
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
                "lagging": self.lagging,
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
    except ValueError:
        # The projector parks such entries on the dead-letter stream; the fold skips them.
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


def _unprojected(
    sale_id: str,
    entries: Iterable[LogEntry],
    archived: set[str],
    progress: dict[int, GroupProgress],
    report: VerifyReport,
) -> list[LogEntry]:
    """Split the sale's entries missing from the archive into lag (counted) and loss (drift).

    An entry is lag when the projector group has not delivered it yet or it is still
    pending; delivered and acknowledged but not archived means it was lost.
    """
    projected: list[LogEntry] = []
    for entry in entries:
        if entry.event.event_id in archived:
            projected.append(entry)
            continue
        group = progress.get(entry.partition)
        if (
            group is None
            or entry.position > parse_stream_id(group.last_delivered)
            or entry.stream_id in group.pending
        ):
            report.lagging += 1
        else:
            report.differences.append(
                Difference(
                    sale_id, "postgres", f"event:{entry.event.event_id}", "projected", "lost"
                )
            )
    return projected


async def verify(
    gateway: RedisGateway, pool: asyncpg.Pool, sale_id: str | None = None
) -> VerifyReport:
    """Fold the whole log and compare every sale (or one) with Redis and PostgreSQL.

    Order matters for a live system: the projector group's progress is read first, then
    PostgreSQL in one snapshot, then the log, so every archived event is in the log read
    and an event acknowledged before the group read is in the PostgreSQL snapshot.
    """
    report = VerifyReport()
    progress = await gateway.group_progress(CONSUMER_GROUP)
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # The first statement fixes the snapshot that every later read in here sees.
        archived_rows = await conn.fetch(
            "SELECT event_id, sale_id FROM events WHERE $1::text IS NULL OR sale_id = $1",
            sale_id,
        )
        archived = {r["event_id"] for r in archived_rows}
        projected = {r["sale_id"] for r in await conn.fetch("SELECT sale_id FROM stock_view")}
        log = await read_log(gateway, report)
        by_sale: dict[str, list[LogEntry]] = defaultdict(list)
        for entries in log.values():
            report.events += len(entries)
            for entry in entries:
                by_sale[entry.event.sale_id].append(entry)
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
            in_pg = _unprojected(name, entries, archived, progress, report)
            state = fold(e.event for e in in_pg).get(name)
            report.differences.extend(await compare_postgres(conn, name, state))
    return report
