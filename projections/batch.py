"""Project a batch of log entries into PostgreSQL, exactly once in effect.

One transaction per batch: archive the events (deduplicated on ``event_id``), apply only
the ones that were new, and advance the checkpoint. A batch delivered again changes
nothing; events arriving out of order converge to the same rows, because stock changes
are additive deltas and a terminal order status is never overwritten by a placement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import asyncpg

from core.events import (
    TERMINAL_EVENTS,
    AnyEvent,
    ReservationCancelled,
    ReservationConfirmed,
    ReservationExpired,
    ReservationPlaced,
    SaleClosed,
    SaleCreated,
    StockAdjusted,
)
from projections.entries import LogEntry
from projections.tables import checkpoints, incoming, orders, stock_view
from projections.tables.events import archive_incoming
from projections.tables.stock_view import StockDelta


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


async def apply_staged(conn: asyncpg.Connection, events: Sequence[AnyEvent]) -> None:
    """Apply new (never applied before) events, staged in ``incoming``, to the orders and
    stock view tables.

    The stock view goes last: its rows (one per sale) are the only ones every consumer
    writes, and a row stays locked until the commit, so taking them after the orders (the
    long statement) keeps a second consumer's batch from waiting that long on them."""
    await orders.write_incoming(
        conn,
        placed=any(isinstance(e, ReservationPlaced) for e in events),
        finished=any(isinstance(e, TERMINAL_EVENTS) for e in events),
    )
    deltas = sorted(stock_deltas(events).items())
    if deltas:
        await stock_view.add_deltas(conn, deltas)


async def advance_checkpoints(
    conn: asyncpg.Connection, group: str, entries: Sequence[LogEntry]
) -> None:
    """Move each partition's checkpoint forward to the highest position in ``entries``."""
    highest: dict[int, tuple[tuple[int, int], str]] = {}
    for entry in entries:
        position = entry.position
        best = highest.get(entry.partition)
        if best is None or position > best[0]:
            highest[entry.partition] = (position, entry.stream_id)
    await checkpoints.advance_group(
        conn, group, [(p, stream_id, pos) for p, (pos, stream_id) in sorted(highest.items())]
    )


async def project(conn: asyncpg.Connection, group: str, entries: Sequence[LogEntry]) -> int:
    """Archive, apply and checkpoint ``entries`` in one transaction; return how many were new.

    The batch is COPIED once into the scratch table ``incoming``, and every table takes its
    rows from there; the events the archive already held are dropped from it first.
    """
    if not entries:
        return 0
    unique = list({e.event.event_id: e for e in entries}.values())
    async with conn.transaction():
        await incoming.stage(conn, unique)
        new_ids = await archive_incoming(conn)
        if len(new_ids) < len(unique):
            await incoming.keep_only(conn, new_ids)
            fresh = set(new_ids)
            await apply_staged(conn, [e.event for e in unique if e.event.event_id in fresh])
        else:
            await apply_staged(conn, [e.event for e in unique])
        await advance_checkpoints(conn, group, unique)
    return len(new_ids)


def occurred(entries: Iterable[LogEntry]) -> datetime | None:
    """The latest ``occurred_at`` among entries (for lag metrics)."""
    return max((e.event.occurred_at for e in entries), default=None)
