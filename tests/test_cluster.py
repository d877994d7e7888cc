"""The purchase path and the HTTP API on a real Redis Cluster (three primaries, a replica
each): the embedded one, or the one FLASHSALE_REDIS_CLUSTER_URL names."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from api.cli.cluster import EmbeddedRedisCluster
from api.cli.launcher import _free_port as free_port
from api.connections import is_cluster, redis_client_for
from api.web.app import create_app
from core.errors import InfrastructureError
from core.gateway import Placed, RedisGateway
from core.gateway.clients import RedisClient
from core.gateway.pipelining import ScriptPipeline
from core.keys import PartitionKeys, partition_of
from core.settings import Settings
from tests.cluster_helpers import command, move_slot, node_client, primary_of, wait_until_settled
from tests.daemons import eventually
from tests.helpers import ADMIN_TOKEN, JWT_SECRET, open_sale
from tests.http_helpers import buyer, session_for

PARTITIONS = 16
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def cluster_settings(redis_cluster_url: str) -> Settings:
    return Settings(
        redis_url=redis_cluster_url,
        admin_token=ADMIN_TOKEN,
        jwt_secret=JWT_SECRET,
        partitions=PARTITIONS,
        redis_pool_size=50,
        sale_view_cache_ms=0,
        metrics_health_interval_ms=0,
    )


def gateway_on(client: RedisClient, **options: Any) -> RedisGateway:
    return RedisGateway(client, PARTITIONS, 3600, **options)


def sales_on_every_primary(client: RedisCluster, per_primary: int) -> list[str]:
    """Sale ids whose partitions live on every primary, ``per_primary`` on each."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for i in range(1000):
        sale_id = f"sale-{i}"
        owner = found[primary_of(client, sale_id, PARTITIONS).name]
        if len(owner) < per_primary:
            owner.append(sale_id)
    assert len(found) == 3 and all(len(ids) == per_primary for ids in found.values())
    return [sale_id for ids in zip(*found.values(), strict=True) for sale_id in ids]


@pytest.mark.single_redis(reason="tells the session's single server apart from a cluster")
async def test_the_url_of_a_cluster_node_gives_a_cluster_client(
    cluster_settings: Settings, settings: Settings
):
    assert is_cluster(cluster_settings)
    assert not is_cluster(settings)  # the single server of the other tests
    assert not is_cluster(cluster_settings.model_copy(update={"redis_cluster": "off"}))
    single = redis_client_for(settings)
    assert isinstance(single, aioredis.Redis)
    await single.aclose()
    # A node that does not answer is taken for a single server (its errors come later).
    nobody = cluster_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert not is_cluster(nobody)
    assert is_cluster(nobody.model_copy(update={"redis_cluster": "on"}))


async def test_the_partitions_spread_evenly_over_the_primaries(cluster: RedisCluster):
    owners = collections.Counter(
        cluster.get_node_from_key(PartitionKeys(p, PARTITIONS).events).name  # type: ignore[union-attr]
        for p in range(PARTITIONS)
    )
    assert len(owners) == 3 and set(owners.values()) <= {5, 6}


async def test_the_console_reads_sales_on_every_primary_in_one_call(cluster: RedisCluster):
    gateway = gateway_on(cluster)
    ids = sales_on_every_primary(cluster, 2)
    for stock, sale_id in enumerate(ids, start=1):
        await open_sale(gateway, sale_id, stock=stock)
    views = await gateway.get_sales([*ids, "no-such-sale"])
    assert [(v.sale_id, v.stock) for v in views] == [(s, n) for n, s in enumerate(ids, start=1)]
    await gateway.save_verify_result('{"clean": true}')
    assert await gateway.last_verify_result() == '{"clean": true}'


async def test_buyers_over_http_never_oversell_across_primaries(
    cluster: RedisCluster, cluster_settings: Settings
):
    sales = sales_on_every_primary(cluster, per_primary=2)[:5]  # 10 units each, 50 in all
    server = TestServer(create_app(cluster_settings, cluster))
    async with server, session_for(server, connections=100) as http:
        for sale_id in sales:
            body = {"sale_id": sale_id, "stock": 10, "per_user_limit": 1}
            async with http.post("/v1/sales", json=body, headers=ADMIN) as response:
                assert response.status == 201, await response.text()

        # 100 buyers, 20 per sale, each asking three times at once: 300 requests.
        async def attempt(user: int) -> tuple[str, int, str]:
            sale_id = sales[user % len(sales)]
            async with http.post(
                f"/v1/sales/{sale_id}/reservations", json={"qty": 1}, headers=buyer(f"u{user}")
            ) as response:
                body = await response.json(content_type=None)
                return f"u{user}", response.status, body.get("reservation_id") or body["code"]

        answers = await asyncio.gather(*(attempt(u) for u in range(100) for _ in range(3)))
        statuses = collections.Counter(status for _, status, _ in answers)
        assert set(statuses) <= {202, 409}, answers
        placed = [(user, rid) for user, status, rid in answers if status == 202]
        assert len(placed) == 50  # every unit, never more
        assert len({user for user, _ in placed}) == 50  # the limit of one per buyer kept
        refused = collections.Counter(code for _, status, code in answers if status == 409)
        assert set(refused) <= {"sold_out", "limit_reached"}

        for sale_id in sales:
            async with http.get(f"/v1/sales/{sale_id}") as response:
                view = await response.json()
            assert (view["remaining"], view["held"], view["status"]) == (0, 10, "sold_out")

        # Confirm one, cancel another: its unit comes back and a new buyer gets it.
        (first, confirmed), (second, cancelled) = placed[0], placed[1]
        async with http.post(
            f"/v1/reservations/{confirmed}/confirm", headers=buyer(first)
        ) as response:
            assert response.status == 200, await response.text()
        async with http.post(
            f"/v1/reservations/{cancelled}/cancel", headers=buyer(second)
        ) as response:
            assert response.status == 200, await response.text()
        async with http.get(f"/v1/reservations/{confirmed}", headers=buyer(first)) as response:
            assert (await response.json())["status"] == "confirmed"
        freed_sale = next(s for s in sales if s == sales[int(second[1:]) % len(sales)])
        async with http.post(
            f"/v1/sales/{freed_sale}/reservations", json={"qty": 1}, headers=buyer("latecomer")
        ) as response:
            assert response.status == 202, await response.text()
        async with http.get(
            f"/v1/sales/{freed_sale}/reservations/mine", headers=buyer("latecomer")
        ) as response:
            assert response.status == 200
            assert [r["status"] for r in (await response.json())["reservations"]] == ["pending"]

        # Stock added, then the sale closed, on a sale of another primary.
        other = next(
            s
            for s in sales
            if primary_of(cluster, s, PARTITIONS) != primary_of(cluster, freed_sale, PARTITIONS)
        )
        async with http.post(
            f"/v1/sales/{other}/stock", json={"delta": 5}, headers=ADMIN
        ) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["remaining"] == 5
        async with http.post(f"/v1/sales/{other}/close", headers=ADMIN) as response:
            assert response.status == 200, await response.text()
        async with http.post(
            f"/v1/sales/{other}/reservations", json={"qty": 1}, headers=buyer("too-late")
        ) as response:
            assert response.status == 409
        # A retried request with its Idempotency-Key finds the reservation it placed.
        keyed = {**buyer("careful"), "Idempotency-Key": "k-1"}
        answered = []
        for _ in range(2):
            async with http.post(
                f"/v1/sales/{freed_sale}/stock", json={"delta": 1}, headers=ADMIN
            ) as response:
                assert response.status == 200
            async with http.post(
                f"/v1/sales/{freed_sale}/reservations", json={"qty": 1}, headers=keyed
            ) as response:
                assert response.status in (200, 202), await response.text()
                answered.append((await response.json())["reservation_id"])
        assert answered[0] == answered[1]
        for route in ("/readyz", "/healthz", "/metrics"):
            async with http.get(route) as response:
                assert response.status == 200, (route, await response.text())


async def test_replies_and_errors_stay_with_their_callers_across_nodes(cluster: RedisCluster):
    incr = cluster.register_script("return redis.call('INCR', KEYS[1])")
    keys = [f"counter-{i}" for i in range(12)]  # spread over the three primaries
    assert len({cluster.get_node_from_key(key).name for key in keys}) == 3  # type: ignore[union-attr]
    await cluster.hset("a-hash", "field", "1")  # INCR on it is a WRONGTYPE error
    scripts = ScriptPipeline(cluster)
    await cluster.script_load(incr.script)
    answers = await asyncio.gather(
        *(scripts.run(incr, [key], []) for key in keys),
        scripts.run(incr, ["a-hash"], []),
        *(scripts.run(incr, [key], []) for key in keys),
        return_exceptions=True,
    )
    assert answers[:12] == [1] * 12 and answers[13:] == [2] * 12
    assert isinstance(answers[12], ResponseError) and "WRONGTYPE" in str(answers[12])


async def test_a_client_of_one_node_taken_for_a_server_answers_moved_as_unavailable(
    cluster_settings: Settings, cluster: RedisCluster
):
    """FLASHSALE_REDIS_CLUSTER=off on a cluster (or a node silent when asked): the calls
    whose keys live on that node run, the others fail with MOVED as a Redis error."""
    plain = redis_client_for(cluster_settings.model_copy(update={"redis_cluster": "off"}))
    assert not isinstance(plain, RedisCluster)
    node = plain.connection_pool.connection_kwargs["port"]
    try:
        sales = sales_on_every_primary(cluster, per_primary=1)
        for sale_id in sales:
            await open_sale(gateway_on(cluster), sale_id, stock=5)
        answers = await asyncio.gather(
            *(gateway_on(plain).reserve(sale_id, "ann", 1, None) for sale_id in sales),
            return_exceptions=True,
        )
        for sale_id, answer in zip(sales, answers, strict=True):
            if int(primary_of(cluster, sale_id, PARTITIONS).port) == node:
                assert isinstance(answer, Placed), answer
            else:
                assert isinstance(answer, InfrastructureError), answer
                assert "MovedError" in str(answer), answer
    finally:
        await plain.aclose()


async def test_wait_for_one_replica_puts_placements_payments_and_cancellations_on_it(
    cluster: RedisCluster,
):
    """Each primary's replica has what its primary answered: the placements, then (one
    batch of confirms and cancels over every primary, one WAIT per primary) their ends."""
    gateway = gateway_on(cluster, wait_replicas=1, wait_timeout_ms=2000)
    sales = sales_on_every_primary(cluster, per_primary=1)
    for sale_id in sales:
        await open_sale(gateway, sale_id, stock=5, per_user_limit=5)
    placements = await asyncio.gather(
        *(gateway.reserve(sale_id, f"buyer-{i}", 1, None) for sale_id in sales for i in range(3))
    )
    await on_replicas(cluster, {placed.reservation_id: b"pending" for placed in placements})
    # Every sale's buyer-0 pays, buyer-1 cancels, buyer-2 keeps the hold.
    confirmed, cancelled = placements[0::3], placements[1::3]
    changes = [gateway.confirm(p.reservation_id, "buyer-0") for p in confirmed]
    changes += [gateway.cancel(p.reservation_id, "buyer-1") for p in cancelled]
    assert await asyncio.gather(*changes) == [True] * len(changes)
    ends = {p.reservation_id: b"confirmed" for p in confirmed}
    ends |= {p.reservation_id: b"cancelled" for p in cancelled}
    await on_replicas(cluster, ends)


async def on_replicas(cluster: RedisCluster, statuses: dict[str, bytes]) -> None:
    """Each reservation has ``status`` on its primary's replica, read at once: WAIT put it
    there."""
    for rid, status in statuses.items():
        partition = int(rid.split("-")[0])
        key = PartitionKeys(partition, PARTITIONS).reservation(rid)
        replica = cluster.get_node_from_key(key, replica=True)
        assert replica is not None and replica.server_type == "replica"
        reader = node_client(cluster, replica)
        try:
            await reader.execute_command("READONLY")  # type: ignore[no-untyped-call]
            assert await reader.hget(key, "status") == status, rid
        finally:
            await reader.aclose()


async def test_noscript_after_a_flush_on_one_primary_is_recovered(cluster: RedisCluster):
    gateway = gateway_on(cluster)
    await gateway.load_scripts()
    sale_id = sales_on_every_primary(cluster, per_primary=1)[0]
    await open_sale(gateway, sale_id, stock=3)
    primary = node_client(cluster, primary_of(cluster, sale_id, PARTITIONS))
    sha = gateway._reserve.sha
    try:
        await primary.script_flush()
        assert await primary.script_exists(sha) == [False]
        placed = await gateway.reserve(sale_id, "ann", 1, None)
        assert isinstance(placed, Placed)
        assert await primary.script_exists(sha) == [True]
    finally:
        await primary.aclose()


async def test_scripts_are_loaded_on_the_replicas_too(cluster: RedisCluster):
    gateway = gateway_on(cluster)
    await gateway.load_scripts()
    sha = gateway._reserve.sha
    assert len(cluster.get_replicas()) == 3
    for node in cluster.get_replicas():
        reader = node_client(cluster, node)
        try:
            assert await reader.script_exists(sha) == [True]
        finally:
            await reader.aclose()


async def test_a_full_pool_makes_callers_wait_or_answers_unavailable(
    cluster_settings: Settings, cluster: RedisCluster
):
    tiny = redis_client_for(cluster_settings, pool_size=1)
    assert isinstance(tiny, RedisCluster)
    try:
        gateway = gateway_on(tiny)
        sale_id = sales_on_every_primary(cluster, per_primary=1)[0]
        await open_sale(gateway, sale_id, stock=1000, per_user_limit=1000)

        async def buy(i: int) -> object:
            await asyncio.sleep(i % 7 / 1000)  # spread over many loop turns: many batches
            return await gateway.reserve(sale_id, f"u{i % 20}", 1, None)

        answers = await asyncio.gather(*(buy(i) for i in range(200)), return_exceptions=True)
        # Waiting, and past the retry budget a 503 (InfrastructureError): never anything else.
        assert all(isinstance(a, Placed | InfrastructureError) for a in answers), answers
        assert any(isinstance(a, Placed) for a in answers)
    finally:
        await tiny.aclose()


async def test_after_a_failover_the_new_primary_gets_the_scripts_and_the_calls(
    cluster: RedisCluster,
):
    gateway = gateway_on(cluster, wait_replicas=1, wait_timeout_ms=2000)
    await gateway.load_scripts()
    sale_id = sales_on_every_primary(cluster, per_primary=1)[0]
    await open_sale(gateway, sale_id, stock=5, per_user_limit=5)
    key = PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS).sale(sale_id)
    replica = cluster.get_node_from_key(key, replica=True)
    assert replica is not None
    promoted = node_client(cluster, replica)
    try:
        # A replica whose script cache is empty (as after a restart) takes over its primary.
        await promoted.script_flush()
        await promoted.execute_command("CLUSTER FAILOVER")  # type: ignore[no-untyped-call]
        for _ in range(200):
            if (await promoted.info("replication"))["role"] == "master":
                break
            await asyncio.sleep(0.05)
        assert (await promoted.info("replication"))["role"] == "master"
        # The client still sends to the old primary: MOVED, then NOSCRIPT on the new one.
        placed = await gateway.reserve(sale_id, "ann", 1, None)
        assert isinstance(placed, Placed)
        assert await promoted.script_exists(gateway._reserve.sha) == [True]
        assert primary_of(cluster, sale_id, PARTITIONS).port == replica.port
        view = await gateway.get_sale(sale_id)
        assert view is not None and view.held == 1
        await wait_until_settled(cluster, replicas=1)  # for the tests that follow
    finally:
        await promoted.aclose()


async def test_buyers_during_a_slot_migration_never_oversell_and_stay_replicated(
    cluster: RedisCluster,
):
    gateway = gateway_on(cluster, wait_replicas=1, wait_timeout_ms=2000)
    await gateway.load_scripts()
    sale_id = sales_on_every_primary(cluster, per_primary=1)[0]
    await open_sale(gateway, sale_id, stock=60, per_user_limit=1)
    key = PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS).sale(sale_id)
    source = primary_of(cluster, sale_id, PARTITIONS)
    target = next(node for node in cluster.get_primaries() if node.name != source.name)
    slot = cluster.keyslot(key)

    async def buy(i: int) -> object:
        await asyncio.sleep(i / 200)
        return await gateway.reserve(sale_id, f"u{i}", 1, None)

    buying = asyncio.gather(*(buy(i) for i in range(200)), return_exceptions=True)
    await move_slot(cluster, slot, source, target)
    answers = await buying
    placed = [a for a in answers if isinstance(a, Placed)]

    # A move slower than the retry budget turns the placements that keep meeting TRYAGAIN
    # into 503s, "redis busy": not run, nothing changed (the README says so); on a quiet
    # machine none do. Nothing else may fail.
    def kind(answer: object) -> str:
        if isinstance(answer, InfrastructureError) and "redis busy" in str(answer):
            return "busy"
        return type(answer).__name__

    others = collections.Counter(kind(a) for a in answers if not isinstance(a, Placed))
    assert set(others) <= {"SoldOut", "busy"}, others
    assert placed
    view = await gateway.get_sale(sale_id)
    assert view is not None
    assert view.held <= 60 and view.held + view.remaining == 60
    assert len(placed) <= view.held  # an unknown outcome may hold a unit too
    assert primary_of(cluster, sale_id, PARTITIONS).name == target.name
    await wait_until_settled(cluster, replicas=1)


async def test_a_placement_waits_out_a_slot_move_of_more_than_a_second(cluster: RedisCluster):
    """A placement creates keys, which a node refuses (TRYAGAIN) in a slot being moved, so
    none runs in that slot until the move ends. It is tried again until the retry budget's
    2 s have passed: a move that holds the slot for 1.3 s is waited out, and the placement
    runs on the new owner, not answered 503."""
    gateway = gateway_on(cluster)
    await gateway.load_scripts()
    sale_id = sales_on_every_primary(cluster, per_primary=1)[-1]
    await open_sale(gateway, sale_id, stock=5)
    keys = PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS)
    slot = cluster.keyslot(keys.sale(sale_id))
    source = primary_of(cluster, sale_id, PARTITIONS)
    target = next(node for node in cluster.get_primaries() if node.name != source.name)
    moving = asyncio.create_task(move_slot(cluster, slot, source, target, hold=1.3))
    src, dst = node_client(cluster, source), node_client(cluster, target)
    try:

        async def all_keys_moved() -> bool:
            return not await command(src, "CLUSTER COUNTKEYSINSLOT", slot)

        await eventually(all_keys_moved, 10, "the slot's keys did not move")
        assert not moving.done()  # the slot is held: importing on the target
        placed = await gateway.reserve(sale_id, "ann", 1, None)
        assert await dst.exists(keys.reservation(placed.reservation_id)) == 1
    finally:
        await moving
        await src.aclose()
        await dst.aclose()
    await wait_until_settled(cluster, replicas=1)


async def test_calls_bouncing_between_nodes_that_disagree_are_retried(cluster: RedisCluster):
    gateway = gateway_on(cluster)
    await gateway.load_scripts()
    sale_id = sales_on_every_primary(cluster, per_primary=1)[0]
    slot = cluster.keyslot(PartitionKeys(partition_of(sale_id, PARTITIONS), PARTITIONS).events)
    source = primary_of(cluster, sale_id, PARTITIONS)
    target = next(node for node in cluster.get_primaries() if node.name != source.name)
    src, dst = node_client(cluster, source), node_client(cluster, target)
    try:
        # The (empty) slot given away by its owner, and taken by the target only a moment
        # later: meanwhile each answers MOVED to the other.
        await command(src, "CLUSTER SETSLOT", slot, "NODE", await command(dst, "CLUSTER MYID"))
        creating = asyncio.ensure_future(open_sale(gateway, sale_id, stock=5))
        await asyncio.sleep(0.05)
        await command(dst, "CLUSTER SETSLOT", slot, "NODE", await command(dst, "CLUSTER MYID"))
        view = await creating
        assert view.stock == 5
        assert primary_of(cluster, sale_id, PARTITIONS).name == target.name
        assert await gateway.reserve(sale_id, "ann", 1, None)
    finally:
        await src.aclose()
        await dst.aclose()
    await wait_until_settled(cluster, replicas=1)


async def test_buyers_through_a_killed_primary_get_503_then_its_replica(
    cluster_settings: Settings,
):
    # A cluster of its own: this one loses a node.
    own = EmbeddedRedisCluster()
    settings = cluster_settings.model_copy(update={"redis_url": own.start()})
    client = redis_client_for(settings)
    assert isinstance(client, RedisCluster)
    try:
        gateway = gateway_on(client)
        await gateway.load_scripts()
        victim = own.primaries[0]
        sale_id = next(
            s
            for s in (f"sale-{i}" for i in range(1000))
            if primary_of(client, s, PARTITIONS).port == victim.port
        )
        await open_sale(gateway, sale_id, stock=200, per_user_limit=1)

        async def buy(i: int) -> object:
            await asyncio.sleep(i / 100)
            return await gateway.reserve(sale_id, f"u{i}", 1, None)

        buying = asyncio.gather(*(buy(i) for i in range(150)), return_exceptions=True)
        await asyncio.sleep(0.3)
        victim.kill()
        answers = await buying
        # Before the replica takes over: 503s (never a 500), after it: placements again.
        assert all(isinstance(a, Placed | InfrastructureError) for a in answers), answers
        assert any(isinstance(a, InfrastructureError) for a in answers)
        for attempt in range(100):
            try:
                await gateway.reserve(sale_id, f"after-{attempt}", 1, None)
                break
            except InfrastructureError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("no placement after the failover")
        assert primary_of(client, sale_id, PARTITIONS).port != victim.port
        view = await gateway.get_sale(sale_id)
        assert view is not None and view.held + view.remaining == 200
    finally:
        await client.aclose()
        own.stop()
