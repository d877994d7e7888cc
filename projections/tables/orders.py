"""Statements on ``orders``: one row per reservation, as the log leaves it.

The projector writes placements and final states (in any order: a placement never
overwrites a final status); verify reads a sale's rows back. The API reads final
reservations here: they are pruned from Redis once the archive holds their final event
(:mod:`consumers.pruning`), and from then on ``orders`` is where it finds them.
"""

from __future__ import annotations

import asyncpg

from core.errors import InfrastructureError
from core.events import to_ms
from core.models import ReservationView
from projections.rows import ORDER_COLUMNS

# From the projector's scratch table (``incoming``), which holds only events new to the
# archive by then (``events.ARCHIVE_INCOMING`` drops the others). One row per reservation
# (the event with the highest id, as a batch sorted by event id and folded into a dict
# kept), in reservation order, so that writers lock in one order. A placement never
# overwrites the status: a terminal event may have arrived first.
PLACED_FROM_INCOMING = """
INSERT INTO orders AS o (reservation_id, sale_id, user_id, qty, status, placed_at, expires_at)
SELECT DISTINCT ON (reservation_id)
       reservation_id, sale_id, user_id, qty, 'pending', occurred_at, expires_at
FROM incoming WHERE type = 'ReservationPlaced'
ORDER BY reservation_id, event_id DESC
ON CONFLICT (reservation_id) DO UPDATE SET
    placed_at = EXCLUDED.placed_at, expires_at = EXCLUDED.expires_at, updated_at = now()
"""

# A placement's row as the projector COPIES it into ``orders`` when no row of the batch's
# reservations exists yet (:func:`projections.batch.write`): plain insertions, no
# speculative ones (``ON CONFLICT``), which cost each row an extra index search and WAL
# record. A row that exists breaks the primary key and the transaction, and the batch is
# written again with the statement above.
PLACED_COLUMNS = ORDER_COLUMNS[: ORDER_COLUMNS.index("expires_at") + 1]

# Final states: one row per reservation, the event with the highest id; a placement may
# come later (it leaves the status), or have come in an earlier batch.
_FINISHED_INTO = """
INSERT INTO orders AS o (reservation_id, sale_id, user_id, qty, status,
                         confirmed_at, cancelled_at, expired_at)
SELECT r, s, u, q, st,
       CASE WHEN st = 'confirmed' THEN at END,
       CASE WHEN st = 'cancelled' THEN at END,
       CASE WHEN st = 'expired' THEN at END
"""
_FINISHED_ON_CONFLICT = """
ON CONFLICT (reservation_id) DO UPDATE SET
    status = EXCLUDED.status,
    confirmed_at = COALESCE(EXCLUDED.confirmed_at, o.confirmed_at),
    cancelled_at = COALESCE(EXCLUDED.cancelled_at, o.cancelled_at),
    expired_at = COALESCE(EXCLUDED.expired_at, o.expired_at),
    updated_at = now()
"""

FINISHED_FROM_INCOMING = f"""{_FINISHED_INTO}
FROM (
    SELECT DISTINCT ON (reservation_id)
           reservation_id, sale_id, user_id, qty,
           CASE type WHEN 'ReservationConfirmed' THEN 'confirmed'
                     WHEN 'ReservationCancelled' THEN 'cancelled'
                     ELSE 'expired' END,
           occurred_at
    FROM incoming
    WHERE type IN ('ReservationConfirmed', 'ReservationCancelled', 'ReservationExpired')
    ORDER BY reservation_id, event_id DESC
) AS t(r, s, u, q, st, at)
{_FINISHED_ON_CONFLICT}"""

# The same from arrays of the final states' (reservation_id, sale_id, user_id, qty, status,
# occurred_at, event_id), in a batch written as new.
FINISHED_FROM_ARRAYS = f"""{_FINISHED_INTO}
FROM (
    SELECT DISTINCT ON (r) r, s, u, q, st, at
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                $6::timestamptz[], $7::text[]) AS f(r, s, u, q, st, at, e)
    ORDER BY r, e DESC
) AS t
{_FINISHED_ON_CONFLICT}"""


_OF_SALE = "SELECT reservation_id, status, qty, user_id FROM orders WHERE sale_id = $1"

# Seconds to wait for PostgreSQL before answering 503: a read must not hang on it.
_ACQUIRE_TIMEOUT = 5.0

# A pending row is never an answer here: a pending reservation is always in Redis, so one
# missing from it is not pruned but lost, and the API must not pretend otherwise.
_FINAL_ORDER = """
SELECT reservation_id, sale_id, user_id, qty, status,
       COALESCE(expires_at, confirmed_at, cancelled_at, expired_at, updated_at) AS expires_at
FROM orders
WHERE reservation_id = $1 AND status IN ('confirmed', 'cancelled', 'expired')
"""

# A buyer's final reservations in a sale (index ``orders_by_user``), in placement order. A
# row whose placement was never projected (a log trimmed before it) sorts by its last change.
_FINAL_ORDERS_OF = """
SELECT reservation_id, sale_id, user_id, qty, status,
       COALESCE(expires_at, confirmed_at, cancelled_at, expired_at, updated_at) AS expires_at,
       COALESCE(placed_at, updated_at) AS placed_at
FROM orders
WHERE sale_id = $1 AND user_id = $2 AND status IN ('confirmed', 'cancelled', 'expired')
ORDER BY COALESCE(placed_at, updated_at), reservation_id
"""


def _view(row: asyncpg.Record) -> ReservationView:
    return ReservationView(
        reservation_id=row["reservation_id"],
        sale_id=row["sale_id"],
        user_id=row["user_id"],
        qty=row["qty"],
        status=row["status"],
        expires_at=row["expires_at"],
    )


async def _read(pool: asyncpg.Pool, query: str, *args: str) -> list[asyncpg.Record]:
    try:
        async with pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args, timeout=_ACQUIRE_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise InfrastructureError(f"cannot read orders from PostgreSQL: {e}") from e
    return rows


async def final_order(pool: asyncpg.Pool, reservation_id: str) -> ReservationView | None:
    """The reservation as ``orders`` holds it once final (confirmed, cancelled, expired), or
    None when there is no such row or it is still pending."""
    rows = await _read(pool, _FINAL_ORDER, reservation_id)
    return _view(rows[0]) if rows else None


async def final_orders_of(
    pool: asyncpg.Pool, sale_id: str, user_id: str
) -> list[tuple[int, ReservationView]]:
    """The final reservations ``user_id`` placed in ``sale_id`` as ``orders`` holds them,
    each with its placement time (epoch ms), oldest first (then by id). Pending rows are
    left out: a pending reservation is always in Redis, which the caller reads first."""
    rows = await _read(pool, _FINAL_ORDERS_OF, sale_id, user_id)
    return [(to_ms(row["placed_at"]), _view(row)) for row in rows]


async def orders_of_sale(
    conn: asyncpg.Connection, sale_id: str, prefetch: int
) -> dict[str, tuple[str, int, str]]:
    """``reservation_id -> (status, qty, user_id)`` of every row of the sale: read through a
    cursor, so inside a transaction."""
    return {
        r["reservation_id"]: (r["status"], r["qty"], r["user_id"])
        async for r in conn.cursor(_OF_SALE, sale_id, prefetch=prefetch)
    }


async def count_of_sale(conn: asyncpg.Connection, sale_id: str) -> int:
    """How many rows the sale has, whatever their status."""
    count: int = await conn.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale_id)
    return count


async def status_totals(conn: asyncpg.Connection, sale_id: str) -> dict[str, tuple[int, int]]:
    """``status -> (rows, units)`` of the sale's rows."""
    rows = await conn.fetch(
        "SELECT status, count(*) AS n, sum(qty) AS units FROM orders"
        " WHERE sale_id = $1 GROUP BY status",
        sale_id,
    )
    return {r["status"]: (r["n"], r["units"]) for r in rows}


async def buyers_over_one_unit(conn: asyncpg.Connection, sale_id: str) -> int:
    """How many buyers of the sale hold more than one unit in pending or confirmed rows."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM (SELECT user_id FROM orders WHERE sale_id = $1"
        " AND status IN ('pending', 'confirmed') GROUP BY user_id HAVING sum(qty) > 1) d",
        sale_id,
    )
    return count
