"""Real servers for the tests: the ones named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL,
else embedded ones started by the project's own launcher. State is reset before each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from api.cli.launcher import ServerUrls, embedded_servers
from core.gateway import RedisGateway
from core.settings import Settings
from projections.db import open_pool

ADMIN_TOKEN = "test-admin-token"
JWT_SECRET = "test-jwt-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerUrls]:
    env = Settings()
    with embedded_servers(env.redis_url, env.database_url) as urls:
        yield urls


@pytest.fixture
def settings(servers: ServerUrls) -> Settings:
    return Settings(
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        admin_token=ADMIN_TOKEN,
        jwt_secret=JWT_SECRET,
        partitions=4,
        redis_pool_size=100,
        claim_idle_ms=1000,
        consumer_block_ms=100,
        metrics_health_interval_ms=0,  # tests scrape, change state, and scrape again
    )


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url or "", max_connections=settings.redis_pool_size, timeout=10
        )
    )
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    await conn.close()
    pool = await open_pool(settings.database_url or "", 8)
    yield pool
    await pool.close()


@pytest.fixture
def gateway(redis_client: aioredis.Redis, settings: Settings) -> RedisGateway:
    return RedisGateway(redis_client, settings.partitions, settings.idempotency_ttl_seconds)
