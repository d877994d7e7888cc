"""PostgreSQL connection pool, migrated on open."""

from __future__ import annotations

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
