"""Statements on ``events``: the archive of every projected event, at its stream position.

Written by the projector (deduplicated on ``event_id``) and by the rebuild (events the
archive lacks); read in stream order by the log reader, and by verify, retention and
pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from core.events import (
    ReservationCancelled,
    ReservationConfirmed,
    ReservationExpired,
    ReservationPlaced,
    SaleClosed,
    dump_event,
)
from projections.entries import LogEntry, parse_stream_id

Position = tuple[int, int]

COLUMNS = (
    "event_id",
    "partition",
    "stream_id",
    "stream_ms",
    "stream_seq",
    "sale_id",
    "type",
    "occurred_at",
    "payload",
)


# The events archived as the JSON they were read from (LogEntry.payload), when it reads
# back as the very event: no serialising the model again. Not SaleCreated and StockAdjusted:
# the stock view's statement reads their numbers from the payload as integers, and the JSON
# a Lua script wrote may hold one as ``5.0`` or ``1e+14`` (cjson's "%.14g"), which the
# model reads as the integer it is and re-serialises as plain digits.
_AS_READ = frozenset(
    {
        ReservationPlaced,
        ReservationConfirmed,
        ReservationCancelled,
        ReservationExpired,
        SaleClosed,
    }
)


def row_of(entry: LogEntry) -> tuple[Any, ...]:
    """The archive's row of ``entry``, its values in the order of ``COLUMNS``."""
    event = entry.event
    ms, seq = parse_stream_id(entry.stream_id)
    payload = entry.payload
    if payload is None or type(event) not in _AS_READ:
        payload = dump_event(event)
    return (
        event.event_id,
        entry.partition,
        entry.stream_id,
        ms,
        seq,
        event.sale_id,
        event.type,
        event.occurred_at,
        payload,
    )


# From the projector's scratch table, in event id order (two projectors writing overlapping
# batches take the unique index's locks in one order); in the same statement the events the
# archive held already are dropped from the scratch table, so that the statements after it
# apply only the new ones (an anti-join, not NOT IN: that one turns quadratic once the ids
# outgrow work_mem).
ARCHIVE_INCOMING = f"""
WITH archived AS (
    INSERT INTO events ({", ".join(COLUMNS)})
    SELECT {", ".join(COLUMNS)} FROM incoming ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
DELETE FROM incoming AS i
WHERE NOT EXISTS (SELECT FROM archived AS a WHERE a.event_id = i.event_id)
"""

_RANGE = """
SELECT event_id, stream_id, payload::text AS payload FROM events
WHERE (partition, stream_ms, stream_seq) > ($1, $2, $3)
  AND (partition, stream_ms, stream_seq) < ($1, $4, $5)
ORDER BY partition, stream_ms, stream_seq
LIMIT $6
"""

# Positions, not event ids: the position index answers alone (an index-only scan).
_POSITIONS = """
SELECT stream_ms, stream_seq FROM events
WHERE (partition, stream_ms, stream_seq) >= ($1, $2, $3)
  AND (partition, stream_ms, stream_seq) <= ($1, $4, $5)
"""

_COUNT = """
SELECT count(*) FROM events
WHERE (partition, stream_ms, stream_seq) > ($1, $2, $3)
  AND (partition, stream_ms, stream_seq) < ($1, $4, $5)
"""

_IDS_AT = """
SELECT stream_id, event_id FROM events
WHERE partition = $1
  AND (stream_ms, stream_seq) >= ($2, $3) AND (stream_ms, stream_seq) <= ($4, $5)
"""

_OF_TYPES = """
SELECT stream_ms, stream_seq, sale_id,
       payload->>'reservation_id' AS reservation_id, payload->>'user_id' AS user_id
FROM events
WHERE partition = $1 AND type = ANY($2::text[])
  AND (stream_ms, stream_seq) >= ($3, $4) AND (stream_ms, stream_seq) < ($5, $6)
ORDER BY stream_ms, stream_seq
LIMIT $7
"""

_EVENT_IDS = "SELECT event_id FROM events WHERE $1::text IS NULL OR sale_id = $1"


async def archive_missing(conn: asyncpg.Connection, entries: Sequence[LogEntry]) -> int:
    """Archive ``entries`` (inside the caller's transaction) unless already there, in
    stream order; return how many were missing. COPY into a scratch table, then one INSERT:
    faster than ``archive`` for many entries."""
    await conn.execute(
        "CREATE TEMPORARY TABLE rearchive (LIKE events INCLUDING DEFAULTS) ON COMMIT DROP"
    )
    await conn.copy_records_to_table(
        "rearchive",
        records=(row_of(e) for e in entries),
        columns=list(COLUMNS),
        timeout=None,
    )
    columns = ", ".join(COLUMNS)
    status = await conn.execute(
        f"INSERT INTO events ({columns}) SELECT {columns} FROM rearchive"
        " ORDER BY partition, stream_ms, stream_seq ON CONFLICT (event_id) DO NOTHING",
        timeout=None,
    )
    return int(status.rsplit(" ", 1)[-1])


async def read_range(
    conn: asyncpg.Connection, partition: int, after: Position, below: Position, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` archived events (``event_id``, ``stream_id``, ``payload`` as text) of
    a partition with positions in (``after``, ``below``), in stream order."""
    rows: list[asyncpg.Record] = await conn.fetch(_RANGE, partition, *after, *below, limit)
    return rows


async def archived_positions(
    conn: asyncpg.Connection, partition: int, first: Position, last: Position
) -> set[Position]:
    """The positions in [``first``, ``last``] of a partition that the archive holds."""
    rows = await conn.fetch(_POSITIONS, partition, *first, *last)
    return {(r[0], r[1]) for r in rows}


async def count_below(conn: asyncpg.Connection, partition: int, below: Position) -> int:
    """How many events of a partition the archive holds below ``below``."""
    return int(await conn.fetchval(_COUNT, partition, 0, 0, *below))


async def event_ids_at(
    conn: asyncpg.Connection, partition: int, first: Position, last: Position
) -> dict[str, str]:
    """``stream_id -> event_id`` of a partition's archived events in [``first``, ``last``]."""
    rows = await conn.fetch(_IDS_AT, partition, *first, *last)
    return {r["stream_id"]: r["event_id"] for r in rows}


async def reservation_events(
    conn: asyncpg.Connection,
    partition: int,
    types: list[str],
    start: Position,
    below: Position,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to ``limit`` archived events of the given types of a partition, in [``start``,
    ``below``), in stream order: ``stream_ms``, ``stream_seq``, ``sale_id``,
    ``reservation_id``, ``user_id``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _OF_TYPES, partition, types, *start, *below, limit
    )
    return rows


async def event_ids(conn: asyncpg.Connection, sale_id: str | None, prefetch: int) -> set[str]:
    """The ids of every archived event (of one sale, or of all): read through a cursor,
    so inside a transaction."""
    return {r["event_id"] async for r in conn.cursor(_EVENT_IDS, sale_id, prefetch=prefetch)}


async def lock_against_writes(conn: asyncpg.Connection) -> None:
    """Lock the archive against writes until the transaction ends; reads go on."""
    await conn.execute("LOCK TABLE events IN EXCLUSIVE MODE")
