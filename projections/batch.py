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
from projections.tables import checkpoints, orders, stock_view
from projections.tables.events import archive
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


async def apply_events(conn: asyncpg.Connection, events: Sequence[AnyEvent]) -> None:
    """Apply new (never applied before) events to the orders and stock view tables."""
    deltas = sorted(stock_deltas(events).items())
    if deltas:
        await stock_view.add_deltas(conn, deltas)
    placed = sorted(
        {e.reservation_id: e for e in events if isinstance(e, ReservationPlaced)}.values(),
        key=lambda e: e.reservation_id,
    )
    if placed:
        await orders.write_placed(conn, placed)
    finished = sorted(
        {
            e.reservation_id: e
            for e in events
            if isinstance(e, ReservationConfirmed | ReservationCancelled | ReservationExpired)
        }.values(),
        key=lambda e: e.reservation_id,
    )
    if finished:
        await orders.write_finished(conn, finished)


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
    await checkpoints.advance_group(
        conn, group, [(e.partition, e.stream_id, e.position) for e in ordered]
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
