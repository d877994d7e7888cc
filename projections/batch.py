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
from operator import itemgetter
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
from projections.db import copy_rows
from projections.entries import LogEntry
from projections.fold import TERMINAL_STATUS
from projections.tables import checkpoints, events, incoming, orders, stock_view
from projections.tables.events import ARCHIVE_INCOMING, row_of
from projections.tables.stock_view import StockDelta

_FIRST = itemgetter(0)  # a row's key


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
                d.place(event.qty)
            case ReservationConfirmed():
                d.held -= event.qty
                d.confirmed += event.qty
            case ReservationCancelled() | ReservationExpired():
                d.held -= event.qty
                d.remaining += event.qty
                d.released += event.qty
    return deltas


def staged_statements(batch: Batch) -> list[str]:
    """The statements that apply a batch staged in ``incoming`` when some of it may be
    there already, in order: archive the events the archive lacks (the statement drops
    the others from ``incoming``, so that the ones after it apply only the new), write the
    orders (placements, then final states; each only if the batch has some, and each
    skipping what is there: ``ON CONFLICT``) and the stock view's deltas.

    The stock view goes last: its rows (one per sale) are the only ones every consumer
    writes, and a row stays locked until the commit, so taking them after the orders (the
    long statement) keeps a second consumer's batch from waiting that long on them."""
    statements = [ARCHIVE_INCOMING]
    if batch.placements:
        statements.append(orders.PLACED_FROM_INCOMING)
    if batch.finals:
        statements.append(orders.FINISHED_FROM_INCOMING)
    return [*statements, stock_view.ADD_INCOMING]


@dataclass(frozen=True, slots=True)
class Batch:
    """Log entries made ready to write (pure work, no I/O): one per event id, with the rows
    each table takes if every event is new, and the checkpoint each partition moves to.
    Preparing the next batch while PostgreSQL writes this one keeps both busy.

    Rows are in key order (the archive's by event id, the orders' by reservation id, the
    stock view's by sale), so that two projectors writing overlapping batches take the
    unique indexes' locks in one order: they wait on each other, never deadlock."""

    entries: list[LogEntry]
    archive: list[tuple[Any, ...]]  # the archive's rows (events.COLUMNS)
    placements: list[tuple[Any, ...]]  # the placements' order rows (orders.PLACED_COLUMNS)
    finals: list[tuple[Any, ...]]  # the final states' (see orders.FINISHED_FROM_ARRAYS)
    deltas: dict[str, StockDelta]  # what the batch adds to each sale's stock view row
    checkpoints: list[tuple[int, str, tuple[int, int]]]
    # Delivered before (reclaimed, or resumed after a restart): part of it may be archived
    # already, so it is written the way that skips what is there, without trying it as new.
    repeated: bool = False

    def __len__(self) -> int:
        return len(self.entries)

    def records(self) -> list[tuple[Any, ...]]:
        """The batch's rows of the scratch table ``incoming``, for the staged write."""
        return [incoming.record(entry) for entry in self.entries]


def prepare(entries: Iterable[LogEntry], repeated: bool = False) -> Batch:
    """``entries`` ready to write: deduplicated on ``event_id`` (the last kept), their
    rows built, the highest position of each partition found. ``repeated``: some were
    delivered before (see :attr:`Batch.repeated`)."""
    unique = list({e.event.event_id: e for e in entries}.values())
    highest: dict[int, tuple[tuple[int, int], str]] = {}
    archive: list[tuple[Any, ...]] = []
    placements: list[tuple[Any, ...]] = []
    finals: list[tuple[Any, ...]] = []
    held: dict[str, int] = {}  # the placements' units by sale
    others: list[AnyEvent] = []
    for entry in unique:
        row = row_of(entry)
        archive.append(row)
        event = entry.event
        if type(event) is ReservationPlaced:  # nearly every event: first
            sale_id, qty = event.sale_id, event.qty
            placements.append(
                (
                    event.reservation_id,
                    sale_id,
                    event.user_id,
                    qty,
                    "pending",
                    event.occurred_at,
                    event.expires_at,
                )
            )
            held[sale_id] = held.get(sale_id, 0) + qty
        else:
            others.append(event)
            if isinstance(event, TERMINAL_EVENTS):
                finals.append(
                    (
                        event.reservation_id,
                        event.sale_id,
                        event.user_id,
                        event.qty,
                        TERMINAL_STATUS[event.type],
                        event.occurred_at,
                        event.event_id,
                    )
                )
        position = row[3], row[4]  # stream_ms, stream_seq
        best = highest.get(entry.partition)
        if best is None or position > best[0]:
            highest[entry.partition] = (position, entry.stream_id)
    deltas = stock_deltas(others)  # the placements, summed by sale above, added here:
    for sale_id, qty in held.items():  # a third of stock_deltas' cost per event
        deltas.setdefault(sale_id, StockDelta()).place(qty)
    archive.sort(key=_FIRST)
    placements.sort(key=_FIRST)
    checkpoints = [(p, stream_id, pos) for p, (pos, stream_id) in sorted(highest.items())]
    return Batch(unique, archive, placements, finals, deltas, checkpoints, repeated)


async def write(conn: asyncpg.Connection, group: str, batch: Batch) -> int:
    """Archive, apply and checkpoint a prepared batch in one transaction; return how many
    of its events were new.

    First as if every event were new, which is nearly always so: the archive's rows and
    the placements' order rows COPIED straight into their tables (plain insertions: a
    speculative one, ``ON CONFLICT``, costs each row an extra index search and WAL record),
    the final states and the stock view's deltas as arrays. If the unique index of the
    archive or of ``orders`` says otherwise (a delivery repeated, a final state projected
    before its placement, another projector writing the same events), that transaction is
    rolled back, whole, and the batch written again through the scratch table ``incoming``
    with the statements that skip what is there (:func:`staged_statements`). A batch
    delivered before (:attr:`Batch.repeated`) is written that way at once.
    """
    if not batch.entries:
        return 0
    if batch.repeated:  # likely to fail as new, and leave an error in the server's log
        return await _write_staged(conn, group, batch)
    try:
        return await _write_new(conn, group, batch)
    except asyncpg.UniqueViolationError:
        return await _write_staged(conn, group, batch)


async def _write_new(conn: asyncpg.Connection, group: str, batch: Batch) -> int:
    """:func:`write`'s first try: every event new."""
    async with conn.transaction():
        await copy_rows(conn, "events", events.COLUMNS, batch.archive)
        if batch.placements:
            await copy_rows(conn, "orders", orders.PLACED_COLUMNS, batch.placements)
        if batch.finals:
            columns = [list(column) for column in zip(*batch.finals, strict=True)]
            await conn.fetch(orders.FINISHED_FROM_ARRAYS, *columns, timeout=None)
        await stock_view.add_deltas(conn, batch.deltas)
        await checkpoints.advance_group(conn, group, batch.checkpoints)
    return len(batch)


async def _write_staged(conn: asyncpg.Connection, group: str, batch: Batch) -> int:
    """:func:`write`'s second try: the batch COPIED once into the scratch table
    ``incoming``, every table taking from there the rows it lacks."""
    async with conn.transaction():
        await incoming.stage_records(conn, batch.records())
        for statement in staged_statements(batch):
            # fetch, not execute: a prepared statement, planned once per connection
            await conn.fetch(statement, timeout=None)
        # ``incoming`` holds just the new events by now.
        new: int = await conn.fetchval(incoming.COUNT, timeout=None)
        await checkpoints.advance_group(conn, group, batch.checkpoints)
    return new


async def project(conn: asyncpg.Connection, group: str, entries: Sequence[LogEntry]) -> int:
    """Archive, apply and checkpoint ``entries`` in one transaction; return how many were new
    (:func:`prepare`, then :func:`write`)."""
    return await write(conn, group, prepare(entries))


def occurred(entries: Iterable[LogEntry]) -> datetime | None:
    """The latest ``occurred_at`` among entries (for lag metrics)."""
    return max((e.event.occurred_at for e in entries), default=None)
