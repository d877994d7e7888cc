"""Reads of the ``orders`` table for the API: a reservation that Redis no longer keeps.

Final reservations are pruned from Redis once the archive holds their final event
(:mod:`consumers.pruning`); from then on ``orders`` is where the API finds them. The
projector's writes to ``orders`` live with the rest of the projection
(:mod:`projections.projector`).
"""

from __future__ import annotations

import asyncpg

from core.errors import InfrastructureError
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


async def final_order(pool: asyncpg.Pool, reservation_id: str) -> ReservationView | None:
    """The reservation as ``orders`` holds it once final (confirmed, cancelled, expired), or
    None when there is no such row or it is still pending."""
    try:
        async with pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
            row = await conn.fetchrow(_FINAL_ORDER, reservation_id, timeout=_ACQUIRE_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise InfrastructureError(f"cannot read orders from PostgreSQL: {e}") from e
    if row is None:
        return None
    return ReservationView(
        reservation_id=row["reservation_id"],
        sale_id=row["sale_id"],
        user_id=row["user_id"],
        qty=row["qty"],
        status=row["status"],
        expires_at=row["expires_at"],
    )
