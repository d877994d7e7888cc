"""Project a batch of log entries into PostgreSQL, exactly once in effect.

One transaction per batch: archive the events (deduplicated on ``event_id``), apply only
the ones that were new, and advance the checkpoint. A batch delivered again changes
nothing; events arriving out of order converge to the same rows, because stock changes
are additive deltas and a terminal order status is never overwritten by a placement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from core.events import (
    AnyEvent,
    ReservationCancelled,
    ReservationConfirmed,
    ReservationExpired,
    ReservationPlaced,
    SaleClosed,
    SaleCreated,
    StockAdjusted,
    dump_event,
)


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """An event with the stream position it was read from."""

    partition: int
    stream_id: str
    event: AnyEvent

    @property
    def position(self) -> tuple[int, int]:
        return parse_stream_id(self.stream_id)


@dataclass
class StockDelta:
    """Additive change to one sale's stock view row, plus configuration if created."""

    stock: int = 0
    remaining: int = 0
    held: int = 0
    confirmed: int = 0
    released: int = 0
    created: SaleCreated | None = None
    closed: bool = False


def stock_deltas(events: Iterable[AnyEvent]) -> dict[str, StockDelta]:
    """Sum what each event does to its sale's counters (order does not matter)."""
    deltas: dict[str, StockDelta] = {}
    for event in events:
        d = deltas.setdefault(event.sale_id, StockDelta())
        match event:
            case SaleCreated():
                d.stock += event.stock
                d.remaining += event.stock
                d.created = event
            case StockAdjusted():
                d.stock += event.delta
                d.remaining += event.delta
            case SaleClosed():
                d.closed = True
            case ReservationPlaced():
                d.remaining -= event.qty
                d.held += event.qty
            case ReservationConfirmed():
                d.held -= event.qty
                d.confirmed += event.qty
            case ReservationCancelled() | ReservationExpired():
                d.held -= event.qty
                d.remaining += event.qty
                d.released += event.qty
    return deltas


_ARCHIVE = """
INSERT INTO events (event_id, partition, stream_id, stream_ms, stream_seq,
                    sale_id, type, occurred_at, payload)
SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::bigint[],
                     $6::text[], $7::text[], $8::timestamptz[], $9::jsonb[])
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_STOCK = """
INSERT INTO stock_view AS v (sale_id, stock, remaining, held, confirmed, released,
                             per_user_limit, hold_seconds, starts_at, ends_at, closed)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[], $7::int[], $8::int[], $9::timestamptz[],
                     $10::timestamptz[], $11::bool[])
ON CONFLICT (sale_id) DO UPDATE SET
    stock = v.stock + EXCLUDED.stock,
    remaining = v.remaining + EXCLUDED.remaining,
    held = v.held + EXCLUDED.held,
    confirmed = v.confirmed + EXCLUDED.confirmed,
    released = v.released + EXCLUDED.released,
    per_user_limit = COALESCE(EXCLUDED.per_user_limit, v.per_user_limit),
    hold_seconds = COALESCE(EXCLUDED.hold_seconds, v.hold_seconds),
    starts_at = COALESCE(EXCLUDED.starts_at, v.starts_at),
    ends_at = COALESCE(EXCLUDED.ends_at, v.ends_at),
    closed = v.closed OR EXCLUDED.closed,
    updated_at = now()
"""

# A placement never overwrites the status: a terminal event may have arrived first.
_PLACED = """
INSERT INTO orders AS o (reservation_id, sale_id, user_id, qty, status, placed_at, expires_at)
SELECT r, s, u, q, 'pending', p, e
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[],
            $6::timestamptz[]) AS t(r, s, u, q, p, e)
ON CONFLICT (reservation_id) DO UPDATE SET
    placed_at = EXCLUDED.placed_at, expires_at = EXCLUDED.expires_at, updated_at = now()
"""

_FINISHED = """
INSERT INTO orders AS o (reservation_id, sale_id, user_id, qty, status,
                         confirmed_at, cancelled_at, expired_at)
SELECT r, s, u, q, st,
       CASE WHEN st = 'confirmed' THEN at END,
       CASE WHEN st = 'cancelled' THEN at END,
       CASE WHEN st = 'expired' THEN at END
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::timestamptz[])
     AS t(r, s, u, q, st, at)
ON CONFLICT (reservation_id) DO UPDATE SET
    status = EXCLUDED.status,
    confirmed_at = COALESCE(EXCLUDED.confirmed_at, o.confirmed_at),
    cancelled_at = COALESCE(EXCLUDED.cancelled_at, o.cancelled_at),
    expired_at = COALESCE(EXCLUDED.expired_at, o.expired_at),
    updated_at = now()
"""

_CHECKPOINT = """
INSERT INTO checkpoints AS c (consumer_group, partition, stream_id, stream_ms, stream_seq)
SELECT $1, * FROM unnest($2::int[], $3::text[], $4::bigint[], $5::bigint[])
ON CONFLICT (consumer_group, partition) DO UPDATE SET
    stream_id = EXCLUDED.stream_id, stream_ms = EXCLUDED.stream_ms,
    stream_seq = EXCLUDED.stream_seq, updated_at = now()
WHERE (EXCLUDED.stream_ms, EXCLUDED.stream_seq) > (c.stream_ms, c.stream_seq)
"""

_TERMINAL_STATUS = {
    "ReservationConfirmed": "confirmed",
    "ReservationCancelled": "cancelled",
    "ReservationExpired": "expired",
}


async def archive(conn: asyncpg.Connection, entries: Sequence[LogEntry]) -> set[str]:
    """Insert entries into the archive; return the event ids that were not there yet."""
    rows = await conn.fetch(
        _ARCHIVE,
        [e.event.event_id for e in entries],
        [e.partition for e in entries],
        [e.stream_id for e in entries],
        [e.position[0] for e in entries],
        [e.position[1] for e in entries],
        [e.event.sale_id for e in entries],
        [e.event.type for e in entries],
        [e.event.occurred_at for e in entries],
        [dump_event(e.event) for e in entries],
    )
    return {r["event_id"] for r in rows}


async def apply_events(conn: asyncpg.Connection, events: Sequence[AnyEvent]) -> None:
    """Apply new (never applied before) events to the orders and stock view tables."""
    deltas = sorted(stock_deltas(events).items())
    if deltas:
        created = [d.created for _, d in deltas]
        await conn.execute(
            _STOCK,
            [sale_id for sale_id, _ in deltas],
            [d.stock for _, d in deltas],
            [d.remaining for _, d in deltas],
            [d.held for _, d in deltas],
            [d.confirmed for _, d in deltas],
            [d.released for _, d in deltas],
            [c.per_user_limit if c else None for c in created],
            [c.hold_seconds if c else None for c in created],
            [c.starts_at if c else None for c in created],
            [c.ends_at if c else None for c in created],
            [d.closed for _, d in deltas],
        )
    placed = sorted(
        {e.reservation_id: e for e in events if isinstance(e, ReservationPlaced)}.values(),
        key=lambda e: e.reservation_id,
    )
    if placed:
        await conn.execute(
            _PLACED,
            [e.reservation_id for e in placed],
            [e.sale_id for e in placed],
            [e.user_id for e in placed],
            [e.qty for e in placed],
            [e.occurred_at for e in placed],
            [e.expires_at for e in placed],
        )
    finished = sorted(
        {
            e.reservation_id: e
            for e in events
            if isinstance(e, ReservationConfirmed | ReservationCancelled | ReservationExpired)
        }.values(),
        key=lambda e: e.reservation_id,
    )
    if finished:
        await conn.execute(
            _FINISHED,
            [e.reservation_id for e in finished],
            [e.sale_id for e in finished],
            [e.user_id for e in finished],
            [e.qty for e in finished],
            [_TERMINAL_STATUS[e.type] for e in finished],
            [e.occurred_at for e in finished],
        )


async def advance_checkpoints(
    conn: asyncpg.Connection, group: str, entries: Sequence[LogEntry]
) -> None:
    """Move each partition's checkpoint forward to the highest position in ``entries``."""
    highest: dict[int, LogEntry] = {}
    for entry in entries:
        best = highest.get(entry.partition)
        if best is None or entry.position > best.position:
            highest[entry.partition] = entry
    ordered = sorted(highest.values(), key=lambda e: e.partition)
    await conn.execute(
        _CHECKPOINT,
        group,
        [e.partition for e in ordered],
        [e.stream_id for e in ordered],
        [e.position[0] for e in ordered],
        [e.position[1] for e in ordered],
    )


async def project(conn: asyncpg.Connection, group: str, entries: Sequence[LogEntry]) -> int:
    """Archive, apply and checkpoint ``entries`` in one transaction; return how many were new."""
    if not entries:
        return 0
    # Sorted, so that two projectors writing overlapping batches lock rows in one order.
    unique = sorted({e.event.event_id: e for e in entries}.values(), key=lambda e: e.event.event_id)
    async with conn.transaction():
        new_ids = await archive(conn, unique)
        await apply_events(conn, [e.event for e in unique if e.event.event_id in new_ids])
        await advance_checkpoints(conn, group, unique)
    return len(new_ids)


def occurred(entries: Iterable[LogEntry]) -> datetime | None:
    """The latest ``occurred_at`` among entries (for lag metrics)."""
    return max((e.event.occurred_at for e in entries), default=None)
