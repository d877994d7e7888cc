"""What the cluster test modules share: plain clients of one node, where a sale lives, and
moving a slot the way ``redis-cli --cluster reshard`` does."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from core.keys import PartitionKeys, partition_of


def node_client(cluster: RedisCluster, node: ClusterNode) -> aioredis.Redis:
    """A plain client of one node."""
    password = cluster.get_connection_kwargs().get("password")
    return aioredis.Redis(host=node.host, port=int(node.port), password=password)


async def command(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def primary_of(client: RedisCluster, sale_id: str, partitions: int) -> ClusterNode:
    """The primary that serves ``sale_id``'s partition."""
    node = client.get_node_from_key(
        PartitionKeys(partition_of(sale_id, partitions), partitions).sale(sale_id)
    )
    assert node is not None
    return node


async def wait_until_settled(cluster: RedisCluster, replicas: int | None = None) -> None:
    """Wait until every node reports the same layout (after a failover or a slot move, the
    nodes not told directly learn of it by gossip) and, when ``replicas`` is given, every
    primary has that many replicas again."""
    layouts: set[Any] = set()
    for _ in range(200):
        await cluster.nodes_manager.initialize()
        layouts = set()
        for node in cluster.get_nodes():
            reader = node_client(cluster, node)
            try:
                rows = await command(reader, "CLUSTER SLOTS")
            finally:
                await reader.aclose()
            layouts.add(tuple(sorted((r[0], r[1], *(n[1] for n in r[2:])) for r in rows)))
        # A row: the slot range, then the primary's port and each replica's.
        if len(layouts) == 1 and (
            replicas is None or all(len(row) == 3 + replicas for row in next(iter(layouts)))
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the nodes disagree on the layout: {layouts}")


async def move_slot(
    cluster: RedisCluster,
    slot: int,
    source: ClusterNode,
    target: ClusterNode,
    *,
    batch: int = 1,
    pause: float = 0.01,
    hold: float = 0.0,
) -> int:
    """Move ``slot`` from ``source`` to ``target`` as ``redis-cli --cluster reshard`` does:
    SETSLOT IMPORTING on the target and MIGRATING on the source, MIGRATE ``batch`` keys at
    a time (``pause`` seconds apart, so calls meet the slot half moved), then, ``hold``
    seconds after the last key (meanwhile the source answers ASK for every key of the
    slot), SETSLOT NODE on the target, the source and the other primaries, in that order.
    Returns how many keys moved."""
    src, dst = node_client(cluster, source), node_client(cluster, target)
    password = cluster.get_connection_kwargs().get("password") or ""
    moved = 0
    try:
        src_id = await command(src, "CLUSTER MYID")
        dst_id = await command(dst, "CLUSTER MYID")
        await command(dst, "CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        await command(src, "CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := await command(src, "CLUSTER GETKEYSINSLOT", slot, batch):
            await command(
                src, "MIGRATE", target.host, target.port, "", 0, 5000, "AUTH", password, "KEYS",
                *keys,
            )  # fmt: skip
            moved += len(keys)
            await asyncio.sleep(pause)
        await asyncio.sleep(hold)
        others = [n for n in cluster.get_primaries() if n.name not in (source.name, target.name)]
        for node in (target, source, *others):
            owner = node_client(cluster, node)
            try:
                await command(owner, "CLUSTER SETSLOT", slot, "NODE", dst_id)
            finally:
                await owner.aclose()
    finally:
        await src.aclose()
        await dst.aclose()
    return moved
