"""The session's Redis is the kind FLASHSALE_TEST_REDIS asks for, and each test starts with
all of it empty (on a cluster: every primary)."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from api.connections import is_cluster
from core.gateway.clients import RedisClient
from core.keys import PartitionKeys
from core.settings import Settings
from tests.conftest import ON_CLUSTER, empty
from tests.helpers import every_key


async def test_the_session_redis_is_the_kind_asked_for(
    settings: Settings, redis_client: RedisClient
):
    assert is_cluster(settings) == ON_CLUSTER
    assert isinstance(redis_client, RedisCluster) == ON_CLUSTER
    if isinstance(redis_client, RedisCluster):
        assert len(redis_client.get_primaries()) >= 2


async def test_the_reset_empties_every_primary(redis_client: RedisClient):
    keys = [PartitionKeys(p, 16).events for p in range(16)]  # spread over every primary
    if isinstance(redis_client, RedisCluster):
        owners = {redis_client.get_node_from_key(key).name for key in keys}  # type: ignore[union-attr]
        assert len(owners) == len(redis_client.get_primaries())
    for key in keys:
        await redis_client.xadd(key, {"event": "x"})
    assert len(await every_key(redis_client)) == len(keys)
    await empty(redis_client)
    assert await every_key(redis_client) == []
