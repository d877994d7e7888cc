"""/metrics under a flood of scrapes: consumer health is read at most once per interval, on
a Redis connection of its own, never on the purchase pool.

Counting commands needs INFO commandstats and CONFIG RESETSTAT, so these tests run on an
embedded Redis of their own (the shared one sees other clients' commands).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from api.cli.launcher import EmbeddedRedis
from api.web.app import create_app
from api.web.state import GATEWAY, HEALTH
from core.keys import CONSUMER_GROUP, PartitionKeys
from core.settings import Settings

PARTITIONS = 4
SCRAPES = 50


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    server = EmbeddedRedis()
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
async def probe(own_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis)
    await client.flushall()
    for p in range(PARTITIONS):  # a running service's streams and group
        await client.xgroup_create(
            PartitionKeys(p, PARTITIONS).events, CONSUMER_GROUP, id="0", mkstream=True
        )
    yield client
    await client.aclose()


def _settings(settings: Settings, url: str, interval_ms: int) -> Settings:
    return settings.model_copy(
        update={
            "redis_url": url,
            "partitions": PARTITIONS,
            "metrics_health_interval_ms": interval_ms,
        }
    )


async def _calls(probe: aioredis.Redis) -> dict[str, int]:
    stats = await probe.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def _clients(probe: aioredis.Redis) -> list[dict[str, str]]:
    me = await probe.client_id()
    return [c for c in await probe.client_list() if int(c["id"]) != me]


async def test_concurrent_scrapes_read_health_once_on_their_own_connection(
    settings: Settings, probe: aioredis.Redis, own_redis: str
):
    app = create_app(_settings(settings, own_redis, interval_ms=60_000))
    async with TestClient(TestServer(app)) as http:
        await app[GATEWAY].ping()  # the purchase pool has its connection
        clients_before = await _clients(probe)
        await probe.config_resetstat()

        bodies = await asyncio.gather(*(http.get("/metrics") for _ in range(SCRAPES)))
        texts = [await b.text() for b in bodies]

        calls = await _calls(probe)
        clients_after = await _clients(probe)
    assert all(b.status == 200 for b in bodies)
    assert all("flashsale_consumer_health_up 1.0" in t for t in texts)
    assert all('flashsale_consumer_lag{group="projector",partition="3"} 0.0' in t for t in texts)
    # One health read: TIME once, XINFO GROUPS once per partition, XLEN per partition + DLQ.
    assert app[HEALTH].reads == 1
    assert calls.get("time") == 1
    assert calls.get("xinfo|groups") == PARTITIONS
    assert calls.get("xlen") == PARTITIONS + 1
    # ... on one new connection, named, not taken from the purchase pool.
    new = [c for c in clients_after if c["id"] not in {b["id"] for b in clients_before}]
    assert [c["name"] for c in new] == ["flashsale-metrics"], new
    assert new[0]["cmd"] in ("xlen", "xinfo|groups", "time")


async def test_health_is_read_again_once_the_interval_has_passed(
    settings: Settings, probe: aioredis.Redis, own_redis: str
):
    app = create_app(_settings(settings, own_redis, interval_ms=300))
    async with TestClient(TestServer(app)) as http:
        first = await (await http.get("/metrics")).text()
        await probe.xadd(PartitionKeys(1, PARTITIONS).events, {"event": "x"})
        await asyncio.gather(*(http.get("/metrics") for _ in range(10)))
        assert app[HEALTH].reads == 1  # cached, so the new entry is not seen yet
        await asyncio.sleep(0.4)
        later = await (await http.get("/metrics")).text()
        assert app[HEALTH].reads == 2
    assert 'flashsale_stream_entries{partition="1"} 0.0' in first
    assert 'flashsale_stream_entries{partition="1"} 1.0' in later
    assert 'flashsale_consumer_lag{group="projector",partition="1"} 1.0' in later


async def test_unreachable_redis_is_reported_and_not_retried_per_scrape(settings: Settings):
    server = EmbeddedRedis()
    url = server.start()
    server.stop()  # nothing listens there any more
    app = create_app(_settings(settings, url, interval_ms=60_000))
    async with TestClient(TestServer(app)) as http:
        bodies = await asyncio.gather(*(http.get("/metrics") for _ in range(10)))
        texts = [await b.text() for b in bodies]
    assert all(b.status == 200 for b in bodies)
    assert all("flashsale_consumer_health_up 0.0" in t for t in texts)
    assert app[HEALTH].reads == 1
