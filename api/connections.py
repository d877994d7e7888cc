"""Connections to Redis and PostgreSQL, built from the settings the same way for the HTTP
app, the command line, the tests and the benchmarks."""

from __future__ import annotations

import functools

import asyncpg
import hiredis
import redis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT

from core.gateway import RedisClient
from core.settings import Settings
from projections.db import open_pool

log = structlog.get_logger(__name__)


def redis_client_for(
    settings: Settings, pool_size: int | None = None, name: str | None = None
) -> RedisClient:
    """A Redis client of ``FLASHSALE_REDIS_URL``: a ``RedisCluster`` when that node is part
    of a cluster (``FLASHSALE_REDIS_CLUSTER``; ``auto`` asks the node), else a ``Redis``
    whose pool waits for a free connection instead of raising when full.

    Its socket timeout is ``FLASHSALE_REDIS_SOCKET_TIMEOUT_MS``; the settings refuse block and
    wait times that would not fit in it. A cluster client holds up to ``pool_size`` (default
    ``FLASHSALE_REDIS_POOL_SIZE``) connections per node and raises ``MaxConnectionsError``
    past that, which the gateway answers by waiting a little, then with a 503.
    """
    assert settings.redis_url, "redis_url must be resolved before building clients"
    timeout = settings.redis_socket_timeout_ms / 1000
    size = pool_size or settings.redis_pool_size
    if is_cluster(settings):
        return RedisCluster.from_url(
            settings.redis_url,
            max_connections=size,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            client_name=name,
            # A MOVED reply patches that slot's owner and nothing else. Every few MOVED
            # replies (redis-py's default) would close every connection, in-flight ones too.
            reinitialize_steps=0,
            # The gateway retries lost replies itself, with the same ids and its own budget;
            # redis-py's retry of a whole pipeline would also send a WAIT to a random node.
            retry=Retry(NoBackoff(), 0),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=size,
        timeout=10,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        client_name=name,
    )
    if pool.connection_class is aioredis.Connection:  # plain TCP (not TLS, not a socket file)
        pool.connection_class = PackingConnection
    return aioredis.Redis(connection_pool=pool)


class PackingConnection(aioredis.Connection):
    """A TCP connection that packs commands with hiredis, in C, as redis-py's synchronous
    client does; its asyncio client packs them in Python, at 13.5 us for the reserve
    script's EVALSHA against 1.7 us (the same bytes). What hiredis does not take (a
    command name of two words such as ``CONFIG GET``, and the types redis-py refuses or
    treats apart: bool, None, bytearray) is packed by redis-py as before."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        name = args[0]
        if not (b" " in name if isinstance(name, bytes) else " " in str(name)):
            try:
                # (hiredis's stub declares a tuple of one item, not of any length)
                return [hiredis.pack_command(args)]  # type: ignore[arg-type]
            except TypeError:
                pass
        return super().pack_command(*args)


def is_cluster(settings: Settings) -> bool:
    """Whether ``FLASHSALE_REDIS_URL`` names a cluster node: as ``FLASHSALE_REDIS_CLUSTER``
    says, or (``auto``) as the node answers to INFO cluster, asked once per process."""
    assert settings.redis_url, "redis_url must be resolved before building clients"
    if settings.redis_cluster != "auto":
        return settings.redis_cluster == "on"
    try:
        return _reports_cluster(settings.redis_url, settings.redis_socket_timeout_ms / 1000)
    except redis.RedisError as e:
        # Not remembered: the next client built asks again. Quiet: the client's own first
        # command meets the same error and reports it (a command line prints one line).
        log.debug("redis_cluster_unknown", error=str(e), assumed="single server")
        return False


@functools.cache
def _reports_cluster(url: str, timeout: float) -> bool:
    # A short blocking probe when the first client is built, before any request is served.
    probe = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(probe.info("cluster").get("cluster_enabled"))
    finally:
        probe.close()


async def postgres_pool_for(settings: Settings, size: int | None = None) -> asyncpg.Pool:
    """A pool of at most ``size`` (default ``FLASHSALE_PG_POOL_SIZE``) connections to the
    migrated database of ``settings``."""
    assert settings.database_url, "database_url must be resolved before building pools"
    return await open_pool(settings.database_url, size or settings.pg_pool_size)
