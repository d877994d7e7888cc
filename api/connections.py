"""Connections to Redis and PostgreSQL, built from the settings the same way for the HTTP
app, the command line, the tests and the benchmarks."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from core.settings import Settings
from projections.db import open_pool


def redis_client_for(
    settings: Settings, pool_size: int | None = None, name: str | None = None
) -> aioredis.Redis:
    """A Redis client whose pool waits for a free connection instead of raising when full.

    Its socket timeout is ``FLASHSALE_REDIS_SOCKET_TIMEOUT_MS``; the settings refuse block and
    wait times that would not fit in it.
    """
    assert settings.redis_url, "redis_url must be resolved before building clients"
    timeout = settings.redis_socket_timeout_ms / 1000
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=pool_size or settings.redis_pool_size,
        timeout=10,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        client_name=name,
    )
    return aioredis.Redis(connection_pool=pool)


async def postgres_pool_for(settings: Settings, size: int | None = None) -> asyncpg.Pool:
    """A pool of at most ``size`` (default ``FLASHSALE_PG_POOL_SIZE``) connections to the
    migrated database of ``settings``."""
    assert settings.database_url, "database_url must be resolved before building pools"
    return await open_pool(settings.database_url, size or settings.pg_pool_size)
