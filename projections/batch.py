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
from typing import Any

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
from projections.tables.events import ARCHIVE_ALL_INCOMING, ARCHIVE_INCOMING
from projections.tables.stock_view import StockDelta

_FINAL_TYPES = frozenset(t.model_fields["type"].default for t in TERMINAL_EVENTS)


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


def apply_statements(batch: Batch, fresh: bool) -> list[str]:
    """The statements that apply a batch staged in ``incoming``, in order: archive the
    events, write the orders (placements, then final states; each only if the batch has
    some) and the stock view's deltas.

    ``fresh``: the statements that take every event as new to the archive and every
    placement as new to ``orders``, plain INSERTs, which a row already there makes fail
    with a unique violation. Otherwise the ones that skip what is there (``ON CONFLICT``):
    the archive's statement drops from ``incoming`` the events it held, so the others apply
    only the new ones.

    The stock view goes last: its rows (one per sale) are the only ones every consumer
    writes, and a row stays locked until the commit, so taking them after the orders (the
    long statement) keeps a second consumer's batch from waiting that long on them."""
    if fresh:
        statements = [ARCHIVE_ALL_INCOMING]
        if batch.placed:
            statements.append(orders.PLACED_ALL_FROM_INCOMING)
    else:
        statements = [ARCHIVE_INCOMING]
        if batch.placed:
            statements.append(orders.PLACED_FROM_INCOMING)
    if batch.finished:
        statements.append(orders.FINISHED_FROM_INCOMING)
    return [*statements, stock_view.ADD_INCOMING]


@dataclass(frozen=True, slots=True)
class Batch:
    """Log entries made ready to write (pure work, no I/O): one per event id, with their
    ``incoming`` records and the checkpoint each partition moves to. Preparing the next
    batch while PostgreSQL writes this one keeps both busy."""

    entries: list[LogEntry]
    records: list[tuple[Any, ...]]
    checkpoints: list[tuple[int, str, tuple[int, int]]]
    placed: bool  # whether any is a placement
    finished: bool  # whether any is a final state (confirmed, cancelled, expired)

    def __len__(self) -> int:
        return len(self.entries)


def prepare(entries: Iterable[LogEntry]) -> Batch:
    """``entries`` ready to write: deduplicated on ``event_id`` (the last kept), their
    records built, the highest position of each partition found."""
    unique = list({e.event.event_id: e for e in entries}.values())
    highest: dict[int, tuple[tuple[int, int], str]] = {}
    records: list[tuple[Any, ...]] = []
    types: set[str] = set()
    for entry in unique:
        record = incoming.record(entry)
        records.append(record)
        types.add(record[6])  # type
        position = record[3], record[4]  # stream_ms, stream_seq
        best = highest.get(entry.partition)
        if best is None or position > best[0]:
            highest[entry.partition] = (position, entry.stream_id)
    checkpoints = [(p, stream_id, pos) for p, (pos, stream_id) in sorted(highest.items())]
    return Batch(
        unique,
        records,
        checkpoints,
        placed="ReservationPlaced" in types,
        finished=not types.isdisjoint(_FINAL_TYPES),
    )


async def write(conn: asyncpg.Connection, group: str, batch: Batch) -> int:
    """Archive, apply and checkpoint a prepared batch in one transaction; return how many
    of its events were new.

    The batch is COPIED once into the scratch table ``incoming``, and every table takes its
    rows from there (:func:`apply_statements`). First as if every event were new, with
    plain INSERTs: that is nearly always so, and a speculative insertion (``ON CONFLICT``)
    costs each row an extra index search and WAL record. If the unique index of the
    archive or of ``orders`` says otherwise (a delivery repeated, a final state projected
    before its placement, another projector writing the same events), that transaction is
    rolled back, whole, and the batch written again with the statements that skip what is
    there. Both take the rows of each table in key order, so two projectors writing
    overlapping batches wait on each other, never deadlock.
    """
    if not batch.entries:
        return 0
    try:
        return await _write(conn, group, batch, fresh=True)
    except asyncpg.UniqueViolationError:
        return await _write(conn, group, batch, fresh=False)


async def _write(conn: asyncpg.Connection, group: str, batch: Batch, fresh: bool) -> int:
    """One try of :func:`write` (see :func:`apply_statements` for ``fresh``)."""
    async with conn.transaction():
        await incoming.stage_records(conn, batch.records)
        for statement in apply_statements(batch, fresh):
            # fetch, not execute: a prepared statement, planned once per connection
            await conn.fetch(statement, timeout=None)
        # Every event was new if the fresh statements went through; else ``incoming``
        # holds just the new ones by now.
        new: int = len(batch) if fresh else await conn.fetchval(incoming.COUNT, timeout=None)
        await checkpoints.advance_group(conn, group, batch.checkpoints)
    return new


async def project(conn: asyncpg.Connection, group: str, entries: Sequence[LogEntry]) -> int:
    """Archive, apply and checkpoint ``entries`` in one transaction; return how many were new
    (:func:`prepare`, then :func:`write`)."""
    return await write(conn, group, prepare(entries))


def occurred(entries: Iterable[LogEntry]) -> datetime | None:
    """The latest ``occurred_at`` among entries (for lag metrics)."""
    return max((e.event.occurred_at for e in entries), default=None)
