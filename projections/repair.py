"""``flashsale replay repair --redis``: rewrite drifted sales in Redis from the fold of the log.

For each sale: read its Redis state as of one stream position (``snapshot_sale``: bounded
chunks, settled by ``fence_sale.lua``), fold the log (archive + stream) up to that position
and compare. When they differ, ``repair_sale.lua`` writes what differs, but only while the
partition's stream has not moved past that position: every script that changes a sale
appends to the stream in the same step, so an unmoved stream proves no reservation slipped
in between the fold and the write. A large repair goes in bounded parts, each fenced so; if
the stream moved, the repair folds again and writes what still differs. The sale keeps
selling throughout; nothing is stopped.

Reservations the fold calls final and Redis no longer holds were pruned once archived: they
are not drift, and the repair does not write them back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import asyncpg
import structlog

from core.events import to_ms
from core.gateway import RedisGateway, ReservationRecord, SaleRepair, SaleSnapshot
from core.keys import partition_of
from projections.entries import parse_stream_id
from projections.log import LogReader, read_sale_tail, read_whole_log
from projections.rows import RowFold
from projections.verify import FINAL, LOG_CHUNK, Difference, LogTail, compare_redis

log = structlog.get_logger(__name__)

CLEAN, REPAIRED, WOULD_REPAIR, NOT_REPAIRED = "clean", "repaired", "would-repair", "unrepaired"


@dataclass
class SaleOutcome:
    """What the repair found and did for one sale."""

    sale_id: str
    status: str  # clean, repaired, would-repair (a dry run), unrepaired (see ``note``)
    differences: list[Difference] = field(default_factory=list)
    note: str = ""
    attempts: int = 0


@dataclass
class RepairReport:
    """Every sale the repair looked at."""

    dry_run: bool
    outcomes: list[SaleOutcome] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Redis now agrees with the log (in a dry run: it already did)."""
        done = (CLEAN,) if self.dry_run else (CLEAN, REPAIRED)
        return all(o.status in done for o in self.outcomes)

    def count(self, status: str) -> int:
        """How many sales ended with ``status``."""
        return sum(o.status == status for o in self.outcomes)

    def to_json(self) -> str:
        """The report for machines."""
        return json.dumps(
            {"dry_run": self.dry_run, "clean": self.clean}
            | {"outcomes": [asdict(o) for o in self.outcomes]},
            indent=2,
            default=str,
        )

    def to_table(self) -> str:
        """The report for people: a summary line, then each changed (or to change) field."""
        total = len(self.outcomes)
        if self.dry_run:
            head = f"DRY RUN: would repair {self.count(WOULD_REPAIR)} of {total} sales in Redis"
        else:
            head = f"repaired {self.count(REPAIRED)} of {total} sales in Redis"
        unrepaired = [o for o in self.outcomes if o.status == NOT_REPAIRED]
        if unrepaired:
            head += f"; {len(unrepaired)} NOT repaired"
        table = [("sale", "outcome", "field", "redis", "log")]
        for o in self.outcomes:
            for d in o.differences if o.status != CLEAN else []:
                table.append((o.sale_id, o.status, d.field, _show(d.actual), _show(d.expected)))
        if len(table) == 1 and not unrepaired:
            return f"{head}: Redis already agrees with the log"
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
        notes = [f"{o.sale_id}: NOT repaired: {o.note}" for o in unrepaired]
        return "\n".join([head, *(line.rstrip() for line in lines), *notes])


def _show(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value)
    return str(value)


def plan_repair(sale_id: str, fold: RowFold, snap: SaleSnapshot) -> SaleRepair:
    """What to write so that Redis holds the fold's state of a sale: the counters and
    configuration, and only the holders, reservations and deadlines that differ from the
    snapshot. A final reservation absent from Redis (pruned) is left absent, and so is
    every reservation the snapshot could not settle."""
    state, created = fold.sales[sale_id], fold.created[sale_id]
    fields = state.counters() | {
        "per_user_limit": created.per_user_limit,
        "hold_seconds": created.hold_seconds,
        "starts_at": to_ms(created.starts_at),
        "ends_at": to_ms(created.ends_at) if created.ends_at else 0,
        "closed": int(state.closed),
    }
    holders = {
        user: state.holders.get(user, 0)
        for user in sorted(set(state.holders) | set(snap.holders))
        if state.holders.get(user, 0) != snap.holders.get(user, 0)
    }
    records = []
    deadlines: dict[str, int] = {}
    for rid in sorted(set(state.reservations) | set(snap.reservations)):
        if rid in snap.unsettled:
            continue
        r = state.reservations.get(rid)
        got = snap.reservations.get(rid)
        if r is None:
            records.append(ReservationRecord(rid, ""))
            continue
        if got is None and r.status in FINAL:
            if rid in snap.deadlines:
                deadlines[rid] = 0
            continue
        want_deadline = to_ms(r.expires_at) if r.status == "pending" and r.expires_at else None
        if snap.deadlines.get(rid) != want_deadline:
            deadlines[rid] = want_deadline or 0
        if (r.status, r.qty, r.user_id) == got:
            continue
        placed, ended = fold.placed_at.get(rid), fold.ended_at.get(rid)
        records.append(
            ReservationRecord(
                reservation_id=rid,
                status=r.status,
                qty=r.qty,
                user_id=r.user_id,
                created_at_ms=to_ms(placed) if placed else 0,
                expires_at_ms=to_ms(r.expires_at) if r.expires_at else 0,
                ended_at_ms=to_ms(ended) if ended and r.status != "pending" else None,
            )
        )
    return SaleRepair(sale_id, snap.last_id, fields, holders, records, deadlines)


async def repair_redis(
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    sale_id: str | None = None,
    *,
    dry_run: bool = False,
    attempts: int = 5,
) -> RepairReport:
    """Compare every sale of the log (or one) with Redis and rewrite those that differ."""
    report = RepairReport(dry_run=dry_run)
    reader = LogReader(gateway, pool, LOG_CHUNK)
    whole = await read_whole_log(reader, gateway.partitions)
    by_sale = whole.by_sale()
    for name in sorted(by_sale) if sale_id is None else [sale_id]:
        partition = partition_of(name, gateway.partitions)
        outcome = SaleOutcome(name, NOT_REPAIRED, note="the stream kept moving; run it again")
        for attempt in range(1, attempts + 1):
            outcome.attempts = attempt
            snap = await gateway.snapshot_sale(name, LogTail(reader))
            upto = parse_stream_id(snap.last_id)
            fold = RowFold()
            tail = await read_sale_tail(
                reader, name, partition, whole.positions[partition], snap.last_id
            )
            for entry in by_sale.get(name, []) + tail:
                if entry.position <= upto:
                    fold.add(entry.event)
            state = fold.sales.get(name)
            if state is None or name not in fold.created:
                if state is None and not snap.exists:
                    outcome.status, outcome.note = CLEAN, "no such sale"
                else:
                    outcome.note = "the log has no SaleCreated for this sale; left as it is"
                    outcome.status = NOT_REPAIRED
                break
            outcome.differences = compare_redis(name, state, snap)
            if not outcome.differences:
                outcome.status = CLEAN
                break
            if dry_run:
                outcome.status = WOULD_REPAIR
                break
            moved_to = await gateway.repair_sale(plan_repair(name, fold, snap))
            if moved_to is None:
                outcome.status, outcome.note = REPAIRED, ""
                break
            log.info("repair_retry", sale_id=name, folded_to=snap.last_id, stream_at=moved_to)
        report.outcomes.append(outcome)
    return report
