"""Statements on ``incoming``: the projector's per-session scratch table of one batch.

A batch is COPIED (binary) into this temporary table, then each projection table takes its
rows from it with one ``INSERT ... SELECT`` (:mod:`projections.tables.events`,
:mod:`projections.tables.orders`): far cheaper per event than binding arrays for every
statement. The table lives as long as the connection and is emptied at every commit, so it
holds one batch at a time; it is no part of the schema (nothing outside the transaction
ever sees it), hence no migration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from core.events import ReservationEvent, ReservationPlaced, SaleCreated
from projections.db import copy_rows
from projections.entries import LogEntry
from projections.tables import events

TABLE = "incoming"

# The archive's columns, then the reservation fields the orders statements read, and the
# times of a sale's window (as exact as the event holds them: milliseconds are no float).
COLUMNS = (
    *events.COLUMNS,
    "reservation_id",
    "user_id",
    "qty",
    "expires_at",
    "starts_at",
    "ends_at",
)

# The types of events's columns, plus the fields the orders and stock view statements read.
# ``qty`` is wider than ``orders.qty``, so that PostgreSQL refuses a quantity beyond it.
_CREATE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {TABLE} (
    event_id text, partition integer, stream_id text, stream_ms bigint, stream_seq bigint,
    sale_id text, type text, occurred_at timestamptz, payload json,
    reservation_id text, user_id text, qty bigint, expires_at timestamptz,
    starts_at timestamptz, ends_at timestamptz
) ON COMMIT DELETE ROWS
"""

_NO_EXTRA = (None,) * (len(COLUMNS) - len(events.COLUMNS))

# How many events the scratch table holds: once ``events.ARCHIVE_INCOMING`` dropped those
# the archive held, the new ones. The commit empties it (ON COMMIT DELETE ROWS: a truncation,
# whatever a DELETE before it left).
COUNT = f"SELECT count(*) FROM {TABLE}"


def record(entry: LogEntry) -> tuple[Any, ...]:
    """The scratch table's row of ``entry``, its values in the order of ``COLUMNS``."""
    event = entry.event
    # Dispatched on the type: ``getattr`` with a default is slow on a pydantic model that
    # lacks the field.
    if type(event) is ReservationPlaced:  # nearly every event: first
        extra: tuple[Any, ...] = (
            event.reservation_id,
            event.user_id,
            event.qty,
            event.expires_at,
            None,
            None,
        )
    elif isinstance(event, ReservationEvent):
        extra = (event.reservation_id, event.user_id, event.qty, None, None, None)
    elif isinstance(event, SaleCreated):
        extra = (None, None, None, None, event.starts_at, event.ends_at)
    else:
        extra = _NO_EXTRA
    return events.row_of(entry) + extra


async def stage_records(conn: asyncpg.Connection, records: Sequence[tuple[Any, ...]]) -> None:
    """COPY records (:func:`record`) into the scratch table (inside the caller's
    transaction).

    Raises ``asyncpg.DataError`` when a value does not fit its column."""
    await conn.execute(_CREATE)
    await copy_rows(conn, TABLE, COLUMNS, records)
