"""Statements on ``stock_view``: one row of counters and configuration per sale.

The projector adds each batch's deltas (additive, so events may arrive in any order),
summed from its scratch table; verify reads the rows back.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from core.errors import InfrastructureError
from core.events import SaleCreated


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

    def place(self, qty: int) -> None:
        """``qty`` units placed on hold: out of remaining, into held."""
        self.remaining -= qty
        self.held += qty


# Deltas are added to the counters; the configuration is the SaleCreated's, once seen.
_ADD_ON_CONFLICT = """
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

# Each sale's deltas summed from the projector's scratch table (``incoming``, holding only
# events new to the archive by then), the sale's configuration from its SaleCreated, if
# there; in sale order, so that writers lock in one order. The same sums as
# :func:`projections.batch.stock_deltas`.
ADD_INCOMING = f"""
INSERT INTO stock_view AS v (sale_id, stock, remaining, held, confirmed, released,
                             per_user_limit, hold_seconds, starts_at, ends_at, closed)
SELECT sale_id, sum(stock), sum(stock) - sum(placed) + sum(released), sum(placed)
       - sum(confirmed) - sum(released), sum(confirmed), sum(released), max(per_user_limit),
       max(hold_seconds), max(starts_at), max(ends_at), bool_or(type = 'SaleClosed')
FROM (
    SELECT sale_id, type, starts_at, ends_at,
           CASE type WHEN 'SaleCreated' THEN (payload->>'stock')::bigint
                     WHEN 'StockAdjusted' THEN (payload->>'delta')::bigint
                     ELSE 0 END AS stock,
           CASE type WHEN 'ReservationPlaced' THEN qty ELSE 0 END AS placed,
           CASE type WHEN 'ReservationConfirmed' THEN qty ELSE 0 END AS confirmed,
           CASE WHEN type IN ('ReservationCancelled', 'ReservationExpired') THEN qty ELSE 0
           END AS released,
           CASE type WHEN 'SaleCreated' THEN (payload->>'per_user_limit')::int
           END AS per_user_limit,
           CASE type WHEN 'SaleCreated' THEN (payload->>'hold_seconds')::int END AS hold_seconds
    FROM incoming
) AS d
GROUP BY sale_id
ORDER BY sale_id
{_ADD_ON_CONFLICT}"""


# The same from arrays of each sale's deltas (:func:`add_deltas`), in a batch written as new.
ADD_DELTAS = f"""
INSERT INTO stock_view AS v (sale_id, stock, remaining, held, confirmed, released,
                             per_user_limit, hold_seconds, starts_at, ends_at, closed)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[], $7::integer[], $8::integer[], $9::timestamptz[],
                     $10::timestamptz[], $11::boolean[])
ORDER BY 1
{_ADD_ON_CONFLICT}"""


async def add_deltas(conn: asyncpg.Connection, deltas: dict[str, StockDelta]) -> None:
    """Add each sale's deltas to its row (made if missing), in sale order, so that writers
    lock in one order."""
    sales = sorted(deltas)
    rows = [deltas[sale] for sale in sales]
    created = [d.created for d in rows]
    await conn.fetch(
        ADD_DELTAS,
        sales,
        [d.stock for d in rows],
        [d.remaining for d in rows],
        [d.held for d in rows],
        [d.confirmed for d in rows],
        [d.released for d in rows],
        [c.per_user_limit if c else None for c in created],
        [c.hold_seconds if c else None for c in created],
        [c.starts_at if c else None for c in created],
        [c.ends_at if c else None for c in created],
        [d.closed for d in rows],
        timeout=None,
    )


async def read_row(conn: asyncpg.Connection, sale_id: str) -> asyncpg.Record | None:
    """The sale's row, or None."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM stock_view WHERE sale_id = $1", sale_id
    )
    return row


async def sale_ids(conn: asyncpg.Connection) -> set[str]:
    """Every sale that has a row."""
    return {r["sale_id"] for r in await conn.fetch("SELECT sale_id FROM stock_view")}


# A listing waits this long for a connection and its answer, then the caller hears 503.
_LIST_TIMEOUT = 5.0


async def newest_sale_ids(pool: asyncpg.Pool, limit: int) -> list[str]:
    """At most ``limit`` sale ids, the latest to start first (then by id). Raises
    ``InfrastructureError`` when PostgreSQL cannot answer."""
    try:
        async with pool.acquire(timeout=_LIST_TIMEOUT) as conn:
            rows = await conn.fetch(
                "SELECT sale_id FROM stock_view"
                " ORDER BY starts_at DESC NULLS LAST, sale_id LIMIT $1",
                limit,
                timeout=_LIST_TIMEOUT,
            )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise InfrastructureError(f"cannot list sales from PostgreSQL: {e}") from e
    return [r["sale_id"] for r in rows]
