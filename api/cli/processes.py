"""Process wiring of the ``flashsale`` command line: the connections a process shares, the
embedded servers started for missing URLs (or an embedded Redis Cluster), the HTTP API (in
this process or in worker processes, see :mod:`api.cli.workers`) and the consumer daemons
run side by side, and SIGINT/SIGTERM ending them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import structlog
from aiohttp import web

from api.cli.cluster import EmbeddedRedisCluster
from api.cli.launcher import embedded_servers
from api.cli.links import ADMIN_TOKEN_FROM_ENV, base_url, page_lines
from api.cli.workers import api_workers, consumer_worker_count, consumer_workers, worker_count
from api.connections import postgres_pool_for, redis_client_for
from api.web.app import create_app
from api.web.metrics import ApiMetrics
from consumers.expiry import ExpiryWorker
from consumers.projector import Projector
from consumers.pruning import PruningWorker
from consumers.retention import RetentionWorker
from core.durability import check_durability
from core.errors import ConfigurationError
from core.gateway import RedisGateway
from core.gateway.clients import RedisClient
from core.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (Linux, macOS), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


@dataclass
class Services:
    """Connections shared by the parts running in one process."""

    settings: Settings
    redis: RedisClient
    pool: asyncpg.Pool
    gateway: RedisGateway


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Redis client and migrated PostgreSQL pool for ``settings``."""
    assert settings.database_url
    client = redis_client_for(settings)
    pool = await postgres_pool_for(settings)
    gateway = RedisGateway.from_settings(client, settings)
    try:
        await gateway.load_scripts()
        yield Services(settings, client, pool, gateway)
    finally:
        await pool.close()
        await client.aclose()


def refuse_redis_url_with_cluster(settings: Settings, redis_cluster: bool) -> None:
    """Raise when ``--redis-cluster`` (an embedded cluster) meets ``FLASHSALE_REDIS_URL``."""
    if redis_cluster and settings.redis_url:
        raise ConfigurationError(
            "--redis-cluster starts an embedded cluster, but FLASHSALE_REDIS_URL is set: "
            "unset it, or drop --redis-cluster to use that server"
        )


@contextlib.contextmanager
def resolved(
    settings: Settings, embedded: bool, *, redis_cluster: bool = False
) -> Iterator[Settings]:
    """Settings with both URLs set, starting embedded servers for missing ones if allowed.

    ``redis_cluster``: start an embedded Redis Cluster (three primaries with a replica each)
    in place of the single embedded Redis; refused when ``FLASHSALE_REDIS_URL`` is set, since
    either one would quietly overrule the other.
    """
    refuse_redis_url_with_cluster(settings, redis_cluster)
    if settings.redis_url and settings.database_url:
        yield settings
        return
    if not embedded:
        raise ConfigurationError(
            "set FLASHSALE_REDIS_URL and FLASHSALE_DATABASE_URL "
            "(or use `flashsale up`, which starts embedded servers)"
        )
    with contextlib.ExitStack() as stack:
        redis_url, shape = settings.redis_url, ""
        update: dict[str, object] = {}
        if redis_cluster:
            cluster = EmbeddedRedisCluster()
            stack.callback(cluster.stop)
            redis_url = cluster.start()
            primaries = ", ".join(str(node.port) for node in cluster.primaries)
            replicas = ", ".join(str(node.port) for node in cluster.replicas)
            shape = (
                f"  (a Redis Cluster: primaries on ports {primaries}, a replica each on {replicas})"
            )
            update["redis_cluster"] = "on"  # known: no need to ask the node
        urls = stack.enter_context(embedded_servers(redis_url, settings.database_url))
        print(f"redis: {urls.redis_url}{shape}\npostgres: {urls.database_url}", file=sys.stderr)
        yield settings.model_copy(
            update=update | {"redis_url": urls.redis_url, "database_url": urls.database_url}
        )


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def projector_for(services: Services, **overrides: int) -> Projector:
    """A projector configured from the settings."""
    s = services.settings
    return Projector(
        services.redis,
        services.pool,
        s.partitions,
        consumer=s.consumer_name,
        batch=overrides.get("batch", s.consumer_batch),
        block_ms=overrides.get("block_ms", s.consumer_block_ms),
        claim_idle_ms=overrides.get("claim_idle_ms", s.claim_idle_ms),
        max_deliveries=overrides.get("max_deliveries", s.max_deliveries),
        lease_ms=overrides.get("lease_ms", s.consumer_lease_ms),
        wait_replicas=s.wait_replicas,
        wait_timeout_ms=s.wait_timeout_ms,
    )


@contextlib.asynccontextmanager
async def running_api(
    services: Services, port: int, *, metrics: ApiMetrics | None = None, reuse_port: bool = False
) -> AsyncIterator[int]:
    """Serve the HTTP API in this process until the block exits; yields the bound port.
    ``reuse_port``: share the port with the other API workers (SO_REUSEPORT)."""
    app = create_app(services.settings, services.redis, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # Everything alive now (modules, schemas, pools) lives as long as the process: frozen
    # out of the garbage collector's sight, so that a full collection scans only what
    # requests make and a busy process does not pause tens of milliseconds for it.
    gc.collect()
    gc.freeze()
    site = web.TCPSite(runner, services.settings.host, port, reuse_port=reuse_port)
    await site.start()
    bound = runner.addresses[0][1]
    log.info("api_listening", host=services.settings.host, port=bound)
    try:
        yield bound
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving_api(services: Services, stop: asyncio.Event) -> AsyncIterator[int]:
    """The HTTP API on the settings' port until the block exits, yielding the bound port: in
    this process with one worker (``FLASHSALE_WORKERS``, default one per CPU), else in that
    many worker processes, where one exiting on its own sets ``stop`` and makes the block's
    exit raise :class:`api.cli.workers.WorkerFailed` once the others are stopped."""
    settings = services.settings
    count = worker_count(settings)
    if count == 1:
        async with running_api(services, settings.port) as port:
            yield port
    else:
        async with api_workers(settings, count, stop) as port:
            yield port


async def serve(settings: Settings) -> None:
    """``flashsale serve``: the HTTP API until a signal."""
    async with open_services(settings) as services:
        await check_durability(services.redis, settings)
        stop = stop_on_signals()
        async with serving_api(services, stop):
            await stop.wait()


def expiry_worker_for(services: Services) -> ExpiryWorker:
    """An expiry worker configured from the settings."""
    s = services.settings
    return ExpiryWorker(services.gateway, s.expiry_interval_ms / 1000, s.expiry_batch)


async def run_consumers(
    services: Services,
    stop: asyncio.Event,
    *,
    retention: bool = False,
    expiry: bool = True,
    **overrides: int,
) -> None:
    """The projector and (with ``expiry``) the expiry worker (and, with ``retention``, the
    stream trimmer and the reservation pruner, unless ``FLASHSALE_RETENTION_INTERVAL_MS`` /
    ``FLASHSALE_PRUNE_INTERVAL_MS`` is 0), side by side, until ``stop`` is set."""
    s = services.settings
    workers = [projector_for(services, **overrides).run(stop)]
    if expiry:
        workers.append(expiry_worker_for(services).run(stop))
    if retention and s.retention_interval_ms:
        trimmer = RetentionWorker(
            services.redis, services.pool, s.partitions, s.retention_interval_ms / 1000
        )
        workers.append(trimmer.run(stop))
    if retention and s.prune_interval_ms:
        pruner = PruningWorker(
            services.gateway,
            services.pool,
            s.prune_interval_ms / 1000,
            s.prune_after_seconds,
            s.prune_batch,
        )
        workers.append(pruner.run(stop))
    await asyncio.gather(*workers)


async def consume(settings: Settings) -> None:
    """``flashsale consume``: the consumer daemons until a signal; with more than one
    consumer worker (``FLASHSALE_CONSUMER_WORKERS``, default one per CPU), in that many
    processes sharing the partitions (:func:`api.cli.workers.consumer_workers`), where one
    exiting on its own stops the others and makes this raise
    :class:`api.cli.workers.WorkerFailed`."""
    async with open_services(settings) as services:
        await check_durability(services.redis, settings)
        stop = stop_on_signals()
        count = consumer_worker_count(settings)
        if count == 1:
            await run_consumers(services, stop, retention=True)
            return
        async with consumer_workers(settings, count, stop):
            await stop.wait()


async def up(settings: Settings, admin_hint: str = ADMIN_TOKEN_FROM_ENV) -> None:
    """``flashsale up``: the HTTP API and the consumer daemons (once, in this process,
    whatever the number of API workers) until a signal. It prints the pages' addresses,
    the buyer page's with a buyer token minted for it, and ``admin_hint``: where the
    console's admin token is."""
    async with open_services(settings) as services:
        await check_durability(services.redis, settings)
        stop = stop_on_signals()
        async with serving_api(services, stop) as port:
            print(
                f"flashsale is up: http://{settings.host}:{port}  (Ctrl-C to stop)", file=sys.stderr
            )
            print(
                page_lines(base_url(settings.host, port), settings.jwt_secret, admin_hint),
                file=sys.stderr,
            )
            await run_consumers(services, stop, retention=True)
