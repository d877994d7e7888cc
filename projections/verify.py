"""``flashsale replay verify``: fold the log and compare it with Redis and PostgreSQL.

Redis is compared with the fold of the log up to the stream position read atomically with
its state. PostgreSQL is compared with the fold of the events its archive holds; a logged
event not archived yet is lag while the projector group has it pending or undelivered, and
drift (lost) once the group has acknowledged it. So a healthy system under load verifies
clean, and an event lost between Redis and PostgreSQL does not.

The log is read by ``projections.log``: the archive for what the streams no longer hold
(trimmed), the streams after. The report prints as a table with one row per differing
(sale, field) and a column each for the log, Redis and PostgreSQL, or as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, astuple, dataclass, field
from typing import Any

import asyncpg

from core.gateway import GroupProgress, RedisGateway, SaleSnapshot, Touched
from core.keys import CONSUMER_GROUP, partition_of
from projections.entries import LogEntry, parse_stream_id
from projections.fold import SaleState, fold
from projections.log import LogReader, acknowledged, read_sale_tail, read_whole_log
from projections.tables import events, stock_view
from projections.tables import orders as orders_table

COUNTERS = ("stock", "remaining", "held", "confirmed", "released")
FINAL = frozenset({"confirmed", "cancelled", "expired"})
# Entries per stream read (XRANGE), rows per archive read: each Redis command stays short.
LOG_CHUNK = 1000


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

    def rows(self) -> list[ThreeWay]:
        """The differences as one row per (sale, field): the log's value and each store's."""
        groups: dict[tuple[str, str], list[Difference]] = {}
        for d in self.differences:
            groups.setdefault((d.sale_id, _canonical(d.field)), []).append(d)
        rows = []
        for (sale_id, canonical), found in groups.items():
            by_store = {d.source: d for d in found}
            log_value = found[0].actual if found[0].source == "log" else found[0].expected
            cells = {}
            for store in ("redis", "postgres"):
                hit = by_store.get(store)
                if hit is None:
                    cells[store] = "=" if _applies(store, canonical) else "-"
                elif hit.expected != log_value:  # compared at another log position (lag)
                    cells[store] = f"{_show(hit.actual)} (log: {_show(hit.expected)})"
                else:
                    cells[store] = _show(hit.actual)
            rows.append(
                ThreeWay(
                    sale_id=sale_id,
                    stores="+".join(d.source for d in found),
                    field=found[0].field if len(found) == 1 else canonical,
                    log=_show(log_value),
                    redis=cells["redis"],
                    postgres=cells["postgres"],
                )
            )
        return rows

    def to_json(self) -> str:
        """The report for machines: counts, every difference, and the three-way rows."""
        return json.dumps(
            {
                "clean": self.clean,
                "sales": self.sales,
                "events": self.events,
                "malformed": self.malformed,
                "lagging": self.lagging,
                "differences": [asdict(d) for d in self.differences],
                "rows": [asdict(r) for r in self.rows()],
            },
            indent=2,
            default=str,
        )

    def to_table(self) -> str:
        """The report for people: one line when clean, else a log | redis | postgres table
        ("=" where a store agrees with the log, "-" where it does not hold the field), and
        a last line counting the log entries that are no event, if any."""
        return self._table() + (
            f"\n{self.malformed} log entries are no event (not UTF-8 or not parseable),"
            " skipped: the projector parked them (flashsale dlq list)"
            if self.malformed
            else ""
        )

    def _table(self) -> str:
        if self.clean:
            return f"clean: {self.sales} sales, {self.events} events agree in log, Redis, PG" + (
                f" ({self.lagging} events not projected yet)" if self.lagging else ""
            )
        header = ("sale", "differs", "field", "log", "redis", "postgres")
        table = [header, *(astuple(r) for r in self.rows())]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
        ]
        drifted = len({r.sale_id for r in self.rows()})
        summary = (
            f"DRIFT: {len(self.differences)} differences in {len(table) - 1} fields"
            f" of {drifted} sales ({self.sales} sales checked)"
        )
        return "\n".join([summary, *lines])


@dataclass(frozen=True, slots=True)
class ThreeWay:
    """One row of the verify table: a field of a sale as the log and each store have it."""

    sale_id: str
    stores: str  # which stores differ from the log, "redis+postgres" when both
    field: str
    log: str
    redis: str
    postgres: str


# Which fields each store holds (by canonical name: an order is a reservation).
_FIELDS = {
    "redis": {*COUNTERS, "holder", "reservation", "sale"},
    "postgres": {*COUNTERS, "reservation", "stock_view", "event"},
}


def _canonical(field: str) -> str:
    return "reservation:" + field.removeprefix("order:") if field.startswith("order:") else field


def _applies(store: str, canonical: str) -> bool:
    return canonical.partition(":")[0] in _FIELDS[store]


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, tuple | list):
        return "/".join(str(v) for v in value)
    return str(value)


async def read_log(
    gateway: RedisGateway, report: VerifyReport | None = None, pool: asyncpg.Pool | None = None
) -> dict[int, list[LogEntry]]:
    """Every event of every partition, in log order, per partition.

    With a pool, the archive supplies what the streams no longer hold (see
    ``projections.log``); without one, the streams alone are read.
    """
    whole = await read_whole_log(LogReader(gateway, pool, LOG_CHUNK), gateway.partitions)
    if report is not None:
        report.malformed += whole.malformed
    return whole.entries


def _upto(entries: Iterable[LogEntry], position: tuple[int, int]) -> SaleState | None:
    sales = fold(e.event for e in entries if e.position <= position)
    return next(iter(sales.values()), None)


class LogTail:
    """What a sale's events after a position touched, read from the log (the archive for
    what the stream no longer holds): the ``SaleLog`` that ``snapshot_sale`` asks."""

    def __init__(self, reader: LogReader) -> None:
        self.reader = reader

    async def touched_since(self, sale_id: str, partition: int, after: str) -> Touched:
        """Users and reservations the sale's events after ``after`` touched."""
        touched = Touched(after)
        position = after
        async for chunk in self.reader.chunks(partition, after):
            position = chunk.last_id
            for entry in chunk.entries:
                event = entry.event
                if event.sale_id != sale_id:
                    continue
                user, rid = getattr(event, "user_id", None), getattr(event, "reservation_id", None)
                if user is not None:
                    touched.users.add(user)
                if rid is not None:
                    touched.reservations.add(rid)
        return Touched(position, touched.users, touched.reservations)


def compare_redis(sale_id: str, expected: SaleState, snap: SaleSnapshot) -> list[Difference]:
    """Differences between the fold and a Redis snapshot of one sale.

    A reservation the fold calls final (confirmed, cancelled, expired) and Redis does not
    hold was pruned once archived: not a difference. A reservation Redis holds must match
    the fold, and a pending one must be there. Reservations the snapshot could not settle
    (``SaleSnapshot.unsettled``) are skipped.
    """
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
        got_r = snap.reservations.get(rid)
        if rid in snap.unsettled or (got_r is None and r is not None and r.status in FINAL):
            continue
        want_r = (r.status, r.qty, r.user_id) if r else None
        if want_r != got_r:
            diffs.append(Difference(sale_id, "redis", f"reservation:{rid}", want_r, got_r))
    return diffs


async def compare_postgres(
    conn: asyncpg.Connection, sale_id: str, expected: SaleState | None
) -> list[Difference]:
    """Differences between the fold (at the checkpoint) and one sale's PostgreSQL rows.

    Runs inside a transaction (the orders are read through a cursor, in chunks)."""
    diffs: list[Difference] = []
    row = await stock_view.read_row(conn, sale_id)
    if expected is None:
        if row is not None:
            diffs.append(Difference(sale_id, "postgres", "stock_view", "absent", "present"))
        return diffs
    if row is None:
        return [Difference(sale_id, "postgres", "stock_view", "present", "missing")]
    for name in COUNTERS:
        if row[name] != getattr(expected, name):
            diffs.append(Difference(sale_id, "postgres", name, getattr(expected, name), row[name]))
    orders = await orders_table.orders_of_sale(conn, sale_id, LOG_CHUNK)
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
        if not acknowledged(entry, progress):
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

    No command holds Redis for long, whatever the size of a sale: the log and the archive
    are read in chunks of ``LOG_CHUNK``, each sale's Redis state through the chunked
    ``snapshot_sale``. Order matters for a live system: the projector group's progress is
    read first, then PostgreSQL in one snapshot, then the log, so every archived event is in
    the log read and an event acknowledged before the group read is in the PostgreSQL
    snapshot.
    """
    report = VerifyReport()
    reader = LogReader(gateway, pool, LOG_CHUNK)
    progress = await gateway.group_progress(CONSUMER_GROUP)
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # The first statement fixes the snapshot that every later read in here sees. The
        # log reader reads the archive on other connections, outside this snapshot, so
        # that an event trimmed from its stream after the snapshot is still found.
        archived = await events.event_ids(conn, sale_id, LOG_CHUNK)
        projected = await stock_view.sale_ids(conn)
        whole = await read_whole_log(reader, gateway.partitions)
        report.malformed += whole.malformed
        by_sale = whole.by_sale()
        report.events = sum(len(entries) for entries in whole.entries.values())
        names = sorted(set(by_sale) | projected) if sale_id is None else [sale_id]
        report.sales = len(names)
        for name in names:
            partition = partition_of(name, gateway.partitions)
            snap = await gateway.snapshot_sale(name, LogTail(reader))
            # Purchases that landed after the log was read: read the tail up to the snapshot.
            entries = by_sale.get(name, []) + await read_sale_tail(
                reader, name, partition, whole.positions[partition], snap.last_id
            )
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
