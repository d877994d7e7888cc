"""PostgreSQL connection pool, migrated on open; binary COPY of rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from core.errors import InfrastructureError
from projections.schema import migrate


async def open_pool(url: str, size: int) -> asyncpg.Pool:
    """A pool of at most ``size`` connections to a migrated database."""
    try:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=size, command_timeout=60)
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise InfrastructureError(f"cannot connect to PostgreSQL: {e}") from e
    await migrate(pool)
    return pool


async def copy_rows(
    conn: asyncpg.Connection, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """COPY ``rows`` (binary) into ``columns`` of ``table``, inside the caller's transaction.

    Raises ``asyncpg.DataError`` when a value does not fit its column: the binary format is
    encoded here, so asyncpg raises Python's errors for it, where PostgreSQL refuses a
    bound argument as data."""
    try:
        await conn.copy_records_to_table(table, records=rows, columns=list(columns), timeout=None)
    except (OverflowError, ValueError, TypeError) as e:
        raise asyncpg.DataError(f"invalid input for COPY into {table}: {e}") from e
