"""Reads of the ``orders`` table for the API: reservations that Redis no longer keeps.

Final reservations are pruned from Redis once the archive holds their final event
(:mod:`consumers.pruning`); from then on ``orders`` is where the API finds them. The
projector's writes to ``orders`` live with the rest of the projection
(:mod:`projections.batch`).
"""

from __future__ import annotations

import asyncpg

from core.errors import InfrastructureError
from core.events import to_ms
from core.models import ReservationView

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
