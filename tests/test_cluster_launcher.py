"""Tests for the embedded Redis Cluster: real nodes formed into a real cluster, no mocks."""

from __future__ import annotations

import itertools
import textwrap

import redis
from redis.cluster import RedisCluster

from api.cli.cluster import CLUSTER_SLOTS, EmbeddedRedisCluster
from tests.daemons import assert_servers_die_with_their_parent, gone_within


def test_cluster_covers_every_slot_with_a_replica_per_primary_and_stops_cleanly() -> None:
    cluster = EmbeddedRedisCluster()
    url = cluster.start()
    pids = [node.pid for node in cluster.nodes]
    dirs = [node.data_dir for node in cluster.nodes]
    try:
        assert len(pids) == 6
        probe = cluster.client_of(cluster.nodes[0])
        slots = probe.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        probe.close()
        covered = sorted((int(low), int(high)) for low, high, *_ in _slot_rows(slots))
        assert covered[0][0] == 0 and covered[-1][1] == CLUSTER_SLOTS - 1
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(covered))
        assert sum(high - low + 1 for low, high in covered) == CLUSTER_SLOTS

        primaries = {node.port for node in cluster.primaries}
        for node in cluster.primaries:
            info = cluster.client_of(node).info("replication")
            assert info["role"] == "master" and info["connected_slaves"] == 1
        for node in cluster.replicas:
            info = cluster.client_of(node).info("replication")
            assert info["role"] == "slave" and info["master_port"] in primaries
        assert (
            len({cluster.client_of(n).info("replication")["master_port"] for n in cluster.replicas})
            == 3
        )

        # A cluster client reached through the returned URL writes to every primary.
        client = RedisCluster.from_url(url)
        for i in range(30):
            client.set(f"key-{i}", i)
        assert [int(client.get(f"key-{i}") or -1) for i in range(30)] == list(range(30))
        assert all(client.dbsize(target_nodes=node) > 0 for node in client.get_primaries())  # type: ignore[no-untyped-call]
        client.close()
        # Nodes refuse a client without the run's password.
        anonymous = redis.Redis(host="127.0.0.1", port=cluster.nodes[0].port)
        try:
            anonymous.ping()
            raise AssertionError("a node answered without the password")
        except redis.AuthenticationError:
            pass
        finally:
            anonymous.close()
    finally:
        cluster.stop()
    assert all(gone_within(pid) for pid in pids)
    assert not any(directory.exists() for directory in dirs)
    assert cluster.nodes == []


def _slot_rows(slots: object) -> list[tuple[int, int, object]]:
    """CLUSTER SLOTS rows: [low, high, primary, *replicas]."""
    assert isinstance(slots, list)
    return [(int(low), int(high), nodes) for low, high, *nodes in slots]


def test_cluster_nodes_die_with_their_parent() -> None:
    assert_servers_die_with_their_parent(
        textwrap.dedent(
            """
            from api.cli.cluster import EmbeddedRedisCluster

            cluster = EmbeddedRedisCluster()
            cluster.start()
            servers = cluster.nodes
            """
        ),
        count=6,
    )
