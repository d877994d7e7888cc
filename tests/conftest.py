"""Real servers for the tests: the ones named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL,
else embedded ones started by the project's own launcher. State is reset before each test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any, Protocol

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser
from redis.asyncio.cluster import RedisCluster

from api.cli.cluster import EmbeddedRedisCluster
from api.cli.launcher import ServerUrls, embedded_servers
from api.connections import redis_client_for
from api.web.app import create_app
from consumers.projector import Projector
from core.gateway import RedisGateway
from core.settings import Settings
from projections.db import open_pool
from tests.browser import headless_chromium
from tests.helpers import ADMIN_TOKEN, JWT_SECRET
from tests.http_helpers import serve, session_for


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerUrls]:
    env = Settings()
    with embedded_servers(env.redis_url, env.database_url) as urls:
        yield urls


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """URL of a Redis Cluster node for the session: FLASHSALE_REDIS_CLUSTER_URL (a cluster
    of three primaries with a replica each, whose data the tests delete), else an embedded
    one of that shape."""
    url = os.environ.get("FLASHSALE_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    cluster = EmbeddedRedisCluster()
    yield cluster.start()
    cluster.stop()


@pytest.fixture
async def cluster(cluster_settings: Settings) -> AsyncIterator[RedisCluster]:
    """A cluster client of the requesting module's ``cluster_settings`` (found to be one from
    the URL), every primary empty."""
    client = redis_client_for(cluster_settings)
    assert isinstance(client, RedisCluster)
    await client.flushdb()
    yield client
    await client.aclose()


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
        sale_view_cache_ms=0,  # read right after a change (test_sale_view_cache tests the cache)
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


class GatewayFactory(Protocol):
    """Builds a gateway from the test settings; keyword arguments override its options."""

    def __call__(self, client: aioredis.Redis | None = None, **options: Any) -> RedisGateway: ...


@pytest.fixture
def make_gateway(redis_client: aioredis.Redis, settings: Settings) -> GatewayFactory:
    """A gateway on ``client`` (the test's Redis by default) with the settings' partitions."""

    def make(client: aioredis.Redis | None = None, **options: Any) -> RedisGateway:
        return RedisGateway(
            client if client is not None else redis_client,
            options.pop("partitions", settings.partitions),
            options.pop("idempotency_ttl_seconds", settings.idempotency_ttl_seconds),
            **options,
        )

    return make


@pytest.fixture
def gateway(make_gateway: GatewayFactory) -> RedisGateway:
    return make_gateway()


class ProjectorFactory(Protocol):
    """Builds a projector daemon from the test settings; keyword arguments override its options."""

    def __call__(
        self,
        consumer: str,
        *,
        client: aioredis.Redis | None = None,
        pool: asyncpg.Pool | None = None,
        **options: Any,
    ) -> Projector: ...


@pytest.fixture
def make_projector(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings
) -> ProjectorFactory:
    """A projector named ``consumer`` on the test's Redis and database (or the ones given)."""
    test_pool = pool

    def make(
        consumer: str,
        *,
        client: aioredis.Redis | None = None,
        pool: asyncpg.Pool | None = None,
        **options: Any,
    ) -> Projector:
        return Projector(
            client if client is not None else redis_client,
            pool if pool is not None else test_pool,
            options.pop("partitions", settings.partitions),
            consumer=consumer,
            **options,
        )

    return make


class AppServerFactory(Protocol):
    """Starts the app on a free TCP port; returns a client session pointed at it."""

    async def __call__(
        self,
        settings: Settings | None = None,
        client: aioredis.Redis | None = None,
        connections: int = 100,
    ) -> aiohttp.ClientSession: ...


@pytest.fixture
async def serve_app(
    settings: Settings, redis_client: aioredis.Redis
) -> AsyncIterator[AppServerFactory]:
    """Factory of app servers (the test's settings and Redis by default), all stopped after."""
    test_settings = settings
    async with AsyncExitStack() as stack:

        async def start(
            settings: Settings | None = None,
            client: aioredis.Redis | None = None,
            connections: int = 100,
        ) -> aiohttp.ClientSession:
            app_server = serve(settings or test_settings, client or redis_client, connections)
            return await stack.enter_async_context(app_server)

        yield start


@pytest.fixture
async def server(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[TestServer]:
    """The app on a free TCP port, with the test's settings and Redis."""
    server = TestServer(create_app(settings, redis_client))
    async with server:
        yield server


@pytest.fixture
async def http(server: TestServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session pointed at ``server``."""
    async with session_for(server) as session:
        yield session


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A real headless Chromium (``tests.browser``); skips, saying why, where there is none."""
    async with headless_chromium() as chromium:
        yield chromium
