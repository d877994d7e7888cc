"""Real servers for the tests: the ones named by FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL,
else embedded ones started by the project's own launcher. State is reset before each test.

The session's Redis is one server, or a Redis Cluster when FLASHSALE_TEST_REDIS=cluster (an
embedded cluster of three primaries with a replica each) or FLASHSALE_REDIS_URL names a
cluster node (whose data the tests delete). On a cluster ``redis_client`` is a cluster
client, the reset empties every primary, and the tests marked ``single_redis`` skip.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any, Protocol

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser
from redis.asyncio.cluster import RedisCluster

from api.cli.cluster import EmbeddedRedisCluster
from api.cli.launcher import ServerUrls, embedded_servers
from api.connections import is_cluster, redis_client_for
from api.web.app import create_app
from consumers.projector import Projector
from core.gateway import RedisGateway
from core.gateway.clients import RedisClient
from core.settings import Settings
from projections.db import open_pool
from tests.browser import contexts_closed_after, headless_chromium
from tests.helpers import ADMIN_TOKEN, JWT_SECRET
from tests.http_helpers import serve, session_for

TEST_REDIS_KINDS = ("single", "cluster")


def _session_redis_is_cluster() -> bool:
    """Whether the session's Redis is a cluster (see the module's docstring)."""
    wanted = os.environ.get("FLASHSALE_TEST_REDIS", "single")
    if wanted not in TEST_REDIS_KINDS:
        raise pytest.UsageError(f"FLASHSALE_TEST_REDIS={wanted!r}: not one of {TEST_REDIS_KINDS}")
    env = Settings()
    if not env.redis_url:
        return wanted == "cluster"
    given = is_cluster(env)
    if wanted == "cluster" and not given:
        raise pytest.UsageError(
            "FLASHSALE_TEST_REDIS=cluster, but FLASHSALE_REDIS_URL does not name a cluster node"
        )
    return given


#: Whether the session's Redis is a cluster; set once the command line is read.
ON_CLUSTER = False


def pytest_configure(config: pytest.Config) -> None:
    global ON_CLUSTER
    ON_CLUSTER = _session_redis_is_cluster()


def pytest_report_header() -> str:
    return f"session redis: {'a cluster' if ON_CLUSTER else 'one server'}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # What ``-m session_redis`` selects: the tests whose outcome depends on which Redis
        # the session has (the others bring their own servers, or need none).
        if "servers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.session_redis)
    if not ON_CLUSTER:
        return
    for item in items:
        marker = item.get_closest_marker("single_redis")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"needs one Redis server: {reason}"))


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerUrls]:
    env = Settings()
    if ON_CLUSTER and not env.redis_url:
        cluster = EmbeddedRedisCluster()
        try:
            with embedded_servers(cluster.start(), env.database_url) as urls:
                yield urls
        finally:
            cluster.stop()
        return
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
        # A cluster client raises past its pool instead of waiting (the gateway then waits
        # a little and answers 503; test_cluster checks that): room for the tests' bursts.
        redis_pool_size=400 if ON_CLUSTER else 100,
        claim_idle_ms=1000,
        consumer_block_ms=100,
        metrics_health_interval_ms=0,  # tests scrape, change state, and scrape again
        sale_view_cache_ms=0,  # read right after a change (test_sale_view_cache tests the cache)
    )


async def empty(client: RedisClient) -> None:
    """Delete every key: FLUSHDB, which a cluster client sends to every primary."""
    await client.flushdb()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[RedisClient]:
    """The session's Redis as the service connects to it (a cluster client on a cluster),
    emptied: every primary of a cluster."""
    client = redis_client_for(settings)
    await empty(client)
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

    def __call__(self, client: RedisClient | None = None, **options: Any) -> RedisGateway: ...


@pytest.fixture
def make_gateway(redis_client: RedisClient, settings: Settings) -> GatewayFactory:
    """A gateway on ``client`` (the test's Redis by default) with the settings' partitions."""

    def make(client: RedisClient | None = None, **options: Any) -> RedisGateway:
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
        client: RedisClient | None = None,
        pool: asyncpg.Pool | None = None,
        **options: Any,
    ) -> Projector: ...


@pytest.fixture
def make_projector(
    redis_client: RedisClient, pool: asyncpg.Pool, settings: Settings
) -> ProjectorFactory:
    """A projector named ``consumer`` on the test's Redis and database (or the ones given)."""
    test_pool = pool

    def make(
        consumer: str,
        *,
        client: RedisClient | None = None,
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
        client: RedisClient | None = None,
        connections: int = 100,
    ) -> aiohttp.ClientSession: ...


@pytest.fixture
async def serve_app(
    settings: Settings, redis_client: RedisClient
) -> AsyncIterator[AppServerFactory]:
    """Factory of app servers (the test's settings and Redis by default), all stopped after."""
    test_settings = settings
    async with AsyncExitStack() as stack:

        async def start(
            settings: Settings | None = None,
            client: RedisClient | None = None,
            connections: int = 100,
        ) -> aiohttp.ClientSession:
            app_server = serve(settings or test_settings, client or redis_client, connections)
            return await stack.enter_async_context(app_server)

        yield start


@pytest.fixture
async def server(settings: Settings, redis_client: RedisClient) -> AsyncIterator[TestServer]:
    """The app on a free TCP port, with the test's settings and Redis."""
    server = TestServer(create_app(settings, redis_client))
    async with server:
        yield server


@pytest.fixture
async def http(server: TestServer) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session pointed at ``server``."""
    async with session_for(server) as session:
        yield session


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium() -> AsyncIterator[Browser]:
    """One real headless Chromium for the whole session (``tests.browser``), driven from the
    session's event loop; skips, saying why, where there is none. Tests take ``browser``."""
    async with headless_chromium() as shared:
        yield shared


@pytest.fixture
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """The session's Chromium for one test. Each context the test opens (``new_context``,
    or ``new_page``, which opens one) has its own cookies, storage and time zone, and is
    closed after the test, so tests stay independent while Chromium starts once."""
    async with contexts_closed_after(chromium):
        yield chromium


@pytest.fixture
def _function_scoped_runner(
    request: pytest.FixtureRequest, _function_scoped_runner: asyncio.Runner
) -> asyncio.Runner:
    """The event loop a test and its function-scoped async fixtures run in (pytest-asyncio's
    runner, overridden): the test's own, except for a test that uses ``browser``, which runs
    with all its fixtures in the session's loop, where the shared Chromium's connection
    lives (Playwright's objects answer only in the loop that made them)."""
    if "browser" in request.fixturenames:
        session: asyncio.Runner = request.getfixturevalue("_session_scoped_runner")
        return session
    return _function_scoped_runner
