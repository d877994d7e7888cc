"""The consumers on a real Redis Cluster (three primaries, a replica each): the projector,
its leases, the expiry worker, retention, consumer health and the dead-letter stream, in
this process and as a real ``flashsale consume``."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster

from consumers.deadletter import list_parked
from consumers.expiry import ExpiryWorker
from consumers.health import read_health
from consumers.projector import Projector
from consumers.pruning import prune_reservations
from consumers.retention import trim_streams
from core.durability import check_durability, read_persistence
from core.errors import DurabilityError
from core.gateway import RedisGateway
from core.keys import CONSUMER_GROUP, PartitionKeys, partition_of
from core.settings import Settings
from projections.verify import verify
from tests.daemons import (
    cli_json,
    env_for,
    eventually,
    running,
    start,
    stop_all,
    stream_length,
    terminate,
    wait_started,
)
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, open_sale, place

PARTITIONS = 16


@pytest.fixture
def cluster_settings(redis_cluster_url: str, settings: Settings) -> Settings:
    return Settings(
        redis_url=redis_cluster_url,
        database_url=settings.database_url,
        admin_token=ADMIN_TOKEN,
        jwt_secret=JWT_SECRET,
        partitions=PARTITIONS,
        redis_pool_size=50,
        sale_view_cache_ms=0,
    )


@pytest.fixture
async def gateway(cluster: RedisCluster) -> RedisGateway:
    gateway = RedisGateway(cluster, PARTITIONS, 3600)
    await gateway.load_scripts()
    return gateway


def primary_of(client: RedisCluster, sale_id: str) -> str:
    node = client.get_node_from_key(
        PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS).sale(sale_id)
    )
    assert node is not None
    return node.name


def sales_on_every_primary(client: RedisCluster, per_primary: int) -> list[str]:
    """Sale ids whose partitions live on every primary, ``per_primary`` on each."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for i in range(1000):
        sale_id = f"sale-{i}"
        owner = found[primary_of(client, sale_id)]
        if len(owner) < per_primary:
            owner.append(sale_id)
    assert len(found) == 3 and all(len(ids) == per_primary for ids in found.values())
    return [sale_id for ids in zip(*found.values(), strict=True) for sale_id in ids]


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    """Orders by status, and archived events, and events archived more than once."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT status, count(*) FROM orders GROUP BY status")
        archived = await conn.fetchval("SELECT count(*) FROM events")
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT partition, stream_id FROM events"
            " GROUP BY partition, stream_id HAVING count(*) > 1) AS t"
        )
    return {str(r["status"]): int(r["count"]) for r in rows} | {
        "events": int(archived),
        "twice": int(twice),
    }


async def test_the_consumers_project_expire_trim_and_park_on_a_cluster(
    cluster: RedisCluster, gateway: RedisGateway, pool: asyncpg.Pool
):
    sales = sales_on_every_primary(cluster, per_primary=2)
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=10, hold_seconds=600)
    placed = [rid for sale_id in sales for rid in await place(gateway, sale_id, ["a", "b", "c"])]
    short = sales[0]
    await open_sale(gateway, "short-hold", stock=5, hold_seconds=1)
    (held,) = await place(gateway, "short-hold", ["d"])
    # Bytes that are not UTF-8, on a stream of another primary than the first sale's.
    odd = PartitionKeys(partition_of(sales[1], PARTITIONS), PARTITIONS).events
    await cluster.xadd(odd, {b"event": b"\xff\xfe not utf-8"})

    # Two projectors sharing the partitions by leases, and the expiry worker.
    projectors = [
        Projector(
            cluster,
            pool,
            PARTITIONS,
            consumer=f"c{i}",
            block_ms=100,
            claim_idle_ms=1000,
            lease_ms=1500,
        )
        for i in range(2)
    ]
    expiry = ExpiryWorker(gateway, interval=0.1)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in projectors]
    tasks.append(asyncio.create_task(expiry.run(stop)))
    try:

        async def projected() -> bool:
            c = await counts(pool)
            return (
                c.get("pending", 0) == len(placed)
                and c.get("expired", 0) == 1
                and c["events"] == await stream_length(cluster, PARTITIONS) - 1
            )

        await eventually(projected, 20, "the events did not reach PostgreSQL")
        both = [p.leases.owned for p in projectors if p.leases]
        assert not both[0] & both[1] and len(both[0] | both[1]) == PARTITIONS
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert expiry.expired == 1
    c = await counts(pool)
    # sales + reservations + the expiry, each archived once; the odd entry parked.
    assert c["events"] == len(sales) + 1 + len(placed) + 1 + 1 and c["twice"] == 0
    async with pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM orders WHERE reservation_id = $1", held)
        ids = {r["reservation_id"] for r in await conn.fetch("SELECT reservation_id FROM orders")}
    assert status == "expired" and ids == {*placed, held}
    (parked,) = await list_parked(cluster)
    assert parked.undecodable and parked.stream == odd
    assert sum(p.dead_lettered for p in projectors) == 1

    health = await read_health(cluster, PARTITIONS)
    assert len(health.groups) == PARTITIONS and sum(g.lag for g in health.groups) == 0
    assert health.dead_letters == 1
    # Everything acknowledged and archived goes, but each stream's newest entry stays.
    results = await trim_streams(cluster, pool, PARTITIONS)
    assert sum(r.trimmed for r in results) > 0
    for p in range(PARTITIONS):
        assert await cluster.xlen(PartitionKeys(p, PARTITIONS).events) <= 1
    # replay verify reads the archive below each trimmed stream, the stream after it.
    report = await verify(gateway, pool)
    assert report.clean, report.differences
    assert (report.sales, report.events, report.malformed) == (len(sales) + 1, c["events"], 1)
    # Health reads the lag of an entry no consumer has read yet.
    await place(gateway, short, ["e"])
    lagging = await read_health(cluster, PARTITIONS)
    assert sum(g.lag for g in lagging.groups) == 1


async def test_flashsale_consume_runs_on_a_cluster(
    cluster: RedisCluster,
    gateway: RedisGateway,
    pool: asyncpg.Pool,
    cluster_settings: Settings,
    tmp_path: Path,
):
    sales = sales_on_every_primary(cluster, per_primary=1)
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=10)
    placed = [rid for sale_id in sales for rid in await place(gateway, sale_id, ["a", "b"])]
    odd = PartitionKeys(partition_of(sales[2], PARTITIONS), PARTITIONS).events
    await cluster.xadd(odd, {b"event": b"\xff not utf-8"})
    env = env_for(
        cluster_settings.redis_url or "",
        cluster_settings.database_url or "",
        PARTITIONS,
        FLASHSALE_RETENTION_INTERVAL_MS="300",
    )
    log_path = tmp_path / "consume.log"
    proc = start(["consume"], env, log_path)
    try:
        await wait_started(proc, log_path)
        alive = running((proc, log_path))

        async def projected() -> bool:
            c = await counts(pool)
            return c.get("pending", 0) == len(placed)

        await eventually(projected, 20, "the events did not reach PostgreSQL", alive)
        placed += await place(gateway, sales[-1], ["c"])
        await eventually(projected, 20, "a later event did not reach PostgreSQL", alive)

        async def trimmed() -> bool:
            return await stream_length(cluster, PARTITIONS) <= len(sales)

        await eventually(trimmed, 20, "retention did not trim the streams", alive)
        report = await cli_json(env, "status")
        assert report["lag"] == 0 and report["dead_letters"] == 1
        assert {g["group"] for g in report["groups"]} == {CONSUMER_GROUP}
        assert len(report["groups"]) == PARTITIONS
        (parked,) = await cli_json(env, "dlq", "list")
        assert parked["stream"] == odd and parked["undecodable"]
        assert await terminate(proc) == 0, log_path.read_text()[-3000:]
    finally:
        stop_all(proc)
    c = await counts(pool)
    assert c["twice"] == 0 and c["events"] == len(sales) + len(placed)


async def test_the_durability_check_asks_every_primary(
    cluster: RedisCluster, cluster_settings: Settings
):
    strict = cluster_settings.model_copy(update={"durability": "strict"})
    primaries = cluster.get_primaries()
    assert len(primaries) == 3
    persistence = await read_persistence(cluster)
    assert persistence.replicas == 1 and not persistence.fsyncs_every_write
    try:
        for node in primaries[:2]:
            await cluster.config_set("appendonly", "yes", target_nodes=node)
            await cluster.config_set("appendfsync", "always", target_nodes=node)
        with pytest.raises(DurabilityError, match="appendonly=no"):
            await check_durability(cluster, strict)  # the third primary falls short
        await cluster.config_set("appendonly", "yes", target_nodes=primaries[2])
        await cluster.config_set("appendfsync", "always", target_nodes=primaries[2])
        assert (await check_durability(cluster, strict)).fsyncs_every_write
    finally:
        for node in primaries:
            await cluster.config_set("appendonly", "no", target_nodes=node)
            await cluster.config_set("appendfsync", "everysec", target_nodes=node)


async def test_pending_entries_are_resumed_and_reclaimed_then_pruned_on_a_cluster(
    cluster: RedisCluster, gateway: RedisGateway, pool: asyncpg.Pool
):
    sales = sales_on_every_primary(cluster, per_primary=1)
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=10)
    placed = {sale_id: await place(gateway, sale_id, ["a", "b"]) for sale_id in sales}
    # A consumer takes every entry and dies holding them.
    dead = Projector(cluster, pool, PARTITIONS, consumer="dead", claim_idle_ms=200)
    await dead.ensure_groups()
    taken = await dead.read_new(block_ms=0)
    assert len(taken) == 3 * len(sales)
    # Back under its name, it resumes at once what it held.
    again = Projector(cluster, pool, PARTITIONS, consumer="dead", claim_idle_ms=200)
    resume = dict.fromkeys(again.streams, "0")
    held = await again.read_own(resume)
    assert {d.position for d in held} == {d.position for d in taken}
    assert {d.deliveries for d in held} == {2}  # a delivery from its history counts too
    # Another consumer reclaims them once idle, counting the delivery.
    await asyncio.sleep(0.3)
    other = Projector(cluster, pool, PARTITIONS, consumer="other", claim_idle_ms=200)
    reclaimed = await other.claim_stale()
    assert {d.position for d in reclaimed} == {d.position for d in taken}
    assert {d.deliveries for d in reclaimed} == {3}
    assert await other.handle(reclaimed) == len(taken)
    health = await read_health(cluster, PARTITIONS)
    assert sum(g.lag for g in health.groups) == 0

    # Final reservations go from Redis once PostgreSQL has their final event.
    for first, second in placed.values():
        assert await gateway.confirm(first, "a")
        assert await gateway.cancel(second, "b")
    while deliveries := await other.read_new(block_ms=0):
        await other.handle(deliveries)
    results = await prune_reservations(gateway, pool, keep_seconds=0)
    assert sum(r.pruned for r in results) == 2 * len(sales)
    for sale_id, ids in placed.items():
        keys = PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS)
        assert not await cluster.exists(*[keys.reservation(rid) for rid in ids])


async def test_the_projector_follows_a_moved_slot(
    cluster: RedisCluster, gateway: RedisGateway, pool: asyncpg.Pool
):
    sales = sales_on_every_primary(cluster, per_primary=1)
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=10)
    projector = Projector(cluster, pool, PARTITIONS, consumer="c", block_ms=0)
    await projector.ensure_groups()
    # The client believes another primary holds the first sale's partition (as after a
    # slot moved without it noticing): its read there meets MOVED and is sent on.
    stream = PartitionKeys(partition_of(sales[0], PARTITIONS), PARTITIONS).events
    slot = cluster.keyslot(stream)
    owner = cluster.nodes_manager.slots_cache[slot][0]
    elsewhere = next(n for n in cluster.get_primaries() if n.name != owner.name)
    cluster.nodes_manager.slots_cache[slot] = [elsewhere]
    read = await projector.read_new()
    assert {d.partition for d in read} == {partition_of(s, PARTITIONS) for s in sales}
    assert cluster.nodes_manager.slots_cache[slot][0].name == owner.name
