"""Statements on ``stock_view``: one row of counters and configuration per sale.

The projector adds each batch's deltas (additive, so events may arrive in any order);
verify reads the rows back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

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


_ADD = """
INSERT INTO stock_view AS v (sale_id, stock, remaining, held, confirmed, released,
                             per_user_limit, hold_seconds, starts_at, ends_at, closed)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[], $7::int[], $8::int[], $9::timestamptz[],
                     $10::timestamptz[], $11::bool[])
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


async def add_deltas(conn: asyncpg.Connection, deltas: Sequence[tuple[str, StockDelta]]) -> None:
    """Add each ``(sale_id, delta)`` to its sale's row (created with the sale's
    configuration if absent); pass them sorted by sale, so that writers lock in one order."""
    created = [d.created for _, d in deltas]
    await conn.execute(
        _ADD,
        [sale_id for sale_id, _ in deltas],
        [d.stock for _, d in deltas],
        [d.remaining for _, d in deltas],
        [d.held for _, d in deltas],
        [d.confirmed for _, d in deltas],
        [d.released for _, d in deltas],
        [c.per_user_limit if c else None for c in created],
        [c.hold_seconds if c else None for c in created],
        [c.starts_at if c else None for c in created],
        [c.ends_at if c else None for c in created],
        [d.closed for _, d in deltas],
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
