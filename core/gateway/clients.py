"""The two kinds of Redis client the gateway runs on (one server, or a Redis Cluster), and
the few things done differently on each."""

from __future__ import annotations

from typing import TypeAlias

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    SlotNotCoveredError,
    TimeoutError,
)
from redis.typing import ScriptTextT

log = structlog.get_logger(__name__)

#: One Redis server, or a Redis Cluster (``api.connections.redis_client_for`` picks).
RedisClient: TypeAlias = aioredis.Redis | RedisCluster

# Errors after which a cluster client must read the cluster's layout again: a node that went
# away, or a cluster in the middle of a failover. Not a full pool (MaxConnectionsError is a
# ConnectionError too): nothing is wrong with the nodes then.
_LAYOUT_CHANGED = (ConnectionError, TimeoutError, ClusterDownError, SlotNotCoveredError)


async def load_everywhere(client: RedisClient, script: ScriptTextT) -> None:
    """SCRIPT LOAD ``script`` on the server, or on every node of a cluster: the replicas
    too, since a replica promoted by a failover keeps the script cache it had."""
    if isinstance(client, RedisCluster):
        await client.execute_command("SCRIPT LOAD", script, target_nodes=RedisCluster.ALL_NODES)
    else:
        await client.script_load(script)


async def refresh_layout(client: RedisClient, error: BaseException) -> None:
    """After ``error``, make a cluster client read which node serves which slots again.

    redis-py does so itself for single commands; a pipeline that fails leaves the old
    layout (the client's retries are off: the gateway retries), so a dead primary would be
    asked again and again. The connections in use by other calls stay open.
    """
    if not isinstance(client, RedisCluster) or isinstance(error, MaxConnectionsError):
        return
    if not isinstance(error, _LAYOUT_CHANGED):
        return
    try:
        await client.nodes_manager.initialize()
    except Exception as e:  # the next failure tries again
        log.warning("redis_cluster_layout_unknown", error=str(e))
